"""runcomfy-worker: Dreamina 4.0 on RunComfy via Celery, archived to S3, with signed webhooks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("runcomfy-worker")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
