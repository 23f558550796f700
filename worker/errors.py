"""Every error the service raises on purpose, classified once, where it happens.

The one drawing of the tree (other modules point here)::

    ServiceError
    ├── ConfigError                   a setting is missing or malformed (names the variable)
    ├── UpstreamError                 RunComfy answered badly or not at all (services.runcomfy)
    │   ├── RetryableUpstreamError    try again later: 408, 429, 5xx (status_code, retry_after_s
    │   │   │                         from Retry-After, seconds or a date); a 2xx whose body has
    │   │   │                         a 5xxxxx error_code; timeouts; refused, reset or
    │   │   │                         half-closed connections
    │   │   └── AmbiguousSubmitError  the submit POST was sent but no answer came back (read
    │   │                             timeout, reset, disconnect): upstream may have accepted,
    │   │                             and billed, a request whose id we never saw
    │   ├── PermanentUpstreamError    fails the same way again: 400/404/422 and every other 4xx;
    │   │   │                         a 2xx whose body has a 4xxxxx error_code (status_code;
    │   │   │                         upstream's message, ~500 chars)
    │   │   ├── NotCancellableError   cancel refused: 409, a 400 saying the request is running,
    │   │   │                         or (producers) a job already running upstream
    │   │   ├── UpstreamAccountError  the account cannot submit: error_code 400002 (balance),
    │   │   │                         400004 (account), 403001 (permission); or HTTP 401/403
    │   │   │                         with no error_code (bad token): not one request's fault
    │   │   └── UpstreamExpiredError  error_code 404001: the request id does not exist, was
    │   │                             deleted or expired (status_code 404)
    │   ├── UpstreamProtocolError     a 2xx that is not the documented answer: malformed JSON,
    │   │                             a missing request_id, an unknown status, an error_code
    │   │                             that is neither 4xxxxx nor 5xxxxx; a redirect
    │   └── GenerationFailedError     upstream reported the generation itself as failed
    ├── DownloadError                 fetching an output file (.retryable)
    │   └── OutputTooLargeError       over the documented size limit
    ├── StorageError                  S3 failed (retryable)
    ├── TargetForbiddenError          URL guard refused a URL from a producer or upstream
    ├── JobNotFoundError              the job store has no such job
    ├── IdempotencyConflictError      same idempotency key, different request
    ├── TransitionRefusedError        the job moved on; a stale or duplicate step
    ├── DeadLetterError               the dead-letter list (rcw:dead)
    │   ├── DeadLetterNotFoundError   no entry at that index / with that id
    │   └── NotRequeueableError       raw message truncated, or no queue known
    └── producer side (worker.producer re-exports these)
        ├── InvalidRequestError       the request does not validate; nothing queued (.errors)
        ├── RedisUnavailableError     Redis (broker and job store) cannot be reached
        ├── WaitTimeoutError          wait()/cancel() ran out of time (.record: last seen)
        └── TryAgainError             the job is being submitted right now; try again shortly

Every UpstreamError has ``error_code`` (RunComfy's numeric code from a top-level
``{error_code, error_message}`` body, or None) and ``upstream_message`` (upstream's own words,
truncated, or None). The RunComfy token never appears in any of these: httpx exceptions, which
hold the request and its headers, are not chained into ours, and echoes of the token in
upstream's words are redacted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from api_contracts.jobs import JobRecord, JobStatus


class ServiceError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigError(ServiceError, ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


class UpstreamError(ServiceError):
    """RunComfy did not give a usable answer.

    ``error_code``: RunComfy's numeric code when its body carried one (``{"error_code":
    400002, "error_message": …}``), else None; ``upstream_message``: upstream's own words
    (truncated, the token redacted) when it said anything, else None."""

    error_code: int | None = None
    upstream_message: str | None = None

    def __init__(
        self, message: str, *, error_code: int | None = None, upstream_message: str | None = None
    ) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.upstream_message = upstream_message


class RetryableUpstreamError(UpstreamError):
    """Worth retrying later (429, 5xx, a 5xxxxx error_code, timeouts, connection errors)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        error_code: int | None = None,
        upstream_message: str | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code, upstream_message=upstream_message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class AmbiguousSubmitError(RetryableUpstreamError):
    """The submit POST was fully sent but no answer was read: a read timeout, a reset or a
    disconnect after sending. Upstream may have accepted (and billed) a request whose id we
    never saw; submitting again may cost a second generation. Never raised by status, result
    or cancel (idempotent reads), nor when nothing was sent (connect/pool/write failures)."""


class PermanentUpstreamError(UpstreamError):
    """Will fail the same way again (bad input, unknown model or request, a 4xxxxx code).

    ``status_code``: the HTTP status; for an error_code on a 2xx answer, the status the code's
    first three digits name (400001 → 400)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_code: int | None = None,
        upstream_message: str | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code, upstream_message=upstream_message)
        self.status_code = status_code


class NotCancellableError(PermanentUpstreamError):
    """The request (or job) is already running upstream: upstream cannot cancel running work.

    ``job_id`` and ``status`` are set when a producer's cancel of a job was refused."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 409,
        job_id: str | None = None,
        status: JobStatus | None = None,
        error_code: int | None = None,
        upstream_message: str | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            error_code=error_code,
            upstream_message=upstream_message,
        )
        self.job_id = job_id
        self.status = status

    @classmethod
    def for_job(cls, job_id: str, status: JobStatus) -> NotCancellableError:
        """A producer's cancel of ``job_id`` refused because the job is ``status``."""
        return cls(
            f"job {job_id} is {status.value}: not cancellable, upstream cannot cancel running work",
            job_id=job_id,
            status=status,
        )


class UpstreamAccountError(PermanentUpstreamError):
    """The account cannot submit anything: RunComfy's error_code 400002 (insufficient
    balance), 400004 (user account error) or 403001 (permission denied), or HTTP 401/403
    without an error_code (a bad or revoked token). Not one request's fault: callers pause
    submissions fleet-wide rather than failing job after job."""


class UpstreamExpiredError(PermanentUpstreamError):
    """RunComfy's error_code 404001: the request id does not exist, was deleted or expired
    (request ids expire; no TTL is published). ``status_code`` is 404 however it came."""

    def __init__(
        self, message: str, *, error_code: int | None = 404001, upstream_message: str | None = None
    ) -> None:
        super().__init__(
            message, status_code=404, error_code=error_code, upstream_message=upstream_message
        )


class UpstreamProtocolError(UpstreamError):
    """Upstream answered with something that is not the documented shape."""


class GenerationFailedError(UpstreamError):
    """Upstream reported the generation as failed in its result."""


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


class DeadLetterError(ServiceError):
    """The dead-letter list could not do what was asked."""


class DeadLetterNotFoundError(DeadLetterError, LookupError):
    """No entry at that index / with that id (it may have been requeued, purged or trimmed)."""


class NotRequeueableError(DeadLetterError):
    """The entry cannot be requeued (raw message truncated, or no queue known)."""


class InvalidRequestError(ServiceError, ValueError):
    """The request does not validate; ``errors`` lists ``(field, reason)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in errors))

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidRequestError:
        """Build from pydantic's error list, naming each field with its dotted path."""
        return cls(
            [
                (
                    ".".join(str(p) for p in e["loc"]) or "request",
                    e["msg"].removeprefix("Value error, "),
                )
                for e in exc.errors()
            ]
        )


class RedisUnavailableError(ServiceError, ConnectionError):
    """Redis (the broker and the job store) could not be reached."""


class WaitTimeoutError(ServiceError, TimeoutError):
    """The job did not reach the awaited state in time; ``record`` is the last one read."""

    def __init__(self, message: str, record: JobRecord) -> None:
        super().__init__(message)
        self.record = record


class TryAgainError(ServiceError):
    """The job is between two states (being submitted upstream); try again in a moment."""
