"""The configured Celery app, read from the environment: ``celery -A worker.app worker``.

Importing this module reads and checks settings (a missing or bad value stops start-up with
exit code 2, naming the variable) and sets up logging, the heartbeat and metrics exactly as
``runcomfy-worker worker`` does; library code and tests use
:func:`worker.queueing.run.create_app` instead.
"""

import sys

from worker.errors import ConfigError
from worker.queueing.run import load_worker_settings, worker_app

try:
    _settings = load_worker_settings()
except ConfigError as exc:
    print(f"runcomfy-worker: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = worker_app(_settings)
