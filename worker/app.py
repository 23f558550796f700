"""The configured Celery app, read from the environment: ``celery -A worker.app worker``.

Importing this module reads settings (a bad value stops start-up naming the variable);
library code and tests use :func:`worker.celery_app.create_app` instead.
"""

from worker.celery_app import create_app

app = create_app()
