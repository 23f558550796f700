"""The configured Celery app, read from the environment: ``celery -A worker.app worker``.

Importing this module reads settings (a bad value stops start-up naming the variable) and
sets up logging, the heartbeat and metrics exactly as ``runcomfy-worker worker`` does; library
code and tests use :func:`worker.queueing.run.create_app` instead.
"""

from worker.queueing.run import worker_app
from worker.settings import load_settings

app = worker_app(load_settings())
