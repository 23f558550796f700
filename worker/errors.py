"""Errors raised by the service's boundaries, classified once, where they happen.

::

    ServiceError
    ├── UpstreamError                 RunComfy answered badly or not at all
    │   ├── RetryableUpstreamError    429, 5xx, timeouts, connection errors (retry_after_s)
    │   ├── PermanentUpstreamError    400/401/403/404/422 and other 4xx (status_code, message)
    │   │   └── NotCancellableError   cancel refused: the request is already running
    │   └── UpstreamProtocolError     malformed JSON or an answer of unknown shape/status
    ├── DownloadError                 fetching an output file (retryable or not)
    ├── StorageError                  S3 failed (retryable)
    ├── TargetForbiddenError          SSRF guard refused a URL from a producer or upstream
    ├── JobNotFoundError              the job store has no such job
    ├── IdempotencyConflictError      same idempotency key, different request
    └── TransitionRefusedError        the job moved on; a stale or duplicate step
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every error this service raises on purpose."""


class UpstreamError(ServiceError):
    """RunComfy did not give a usable answer."""


class RetryableUpstreamError(UpstreamError):
    """Worth retrying later (429, 5xx, timeouts, connection errors)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class PermanentUpstreamError(UpstreamError):
    """Will fail the same way again (bad input, bad token, unknown model or request)."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class NotCancellableError(PermanentUpstreamError):
    """Upstream refused to cancel: the request is already in progress or finished."""


class UpstreamProtocolError(UpstreamError):
    """Upstream answered with something that is not the documented shape."""


class DownloadError(ServiceError):
    """An output file could not be fetched."""

    def __init__(self, message: str, *, retryable: bool, status_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class OutputTooLargeError(DownloadError):
    """An output exceeds the documented size limit."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class StorageError(ServiceError):
    """The S3 endpoint failed; retried with backoff for a while before the job fails."""


class TargetForbiddenError(ServiceError):
    """A producer- or upstream-supplied URL points somewhere this service must not connect."""


class JobNotFoundError(ServiceError):
    """No job with that id in the job store (never created, or expired)."""


class IdempotencyConflictError(ServiceError):
    """The idempotency key already names a job with a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency_key {key!r} already used by job {job_id} with a different request"
        )
        self.key = key
        self.job_id = job_id


class TransitionRefusedError(ServiceError):
    """A status change not allowed from the job's current state (stale or duplicate step)."""
