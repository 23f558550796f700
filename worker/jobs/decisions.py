"""What to do next, as pure functions of (state, upstream answer, attempt, clock).

Tasks gather the facts, call one of these, and act on the value it returns; time and jitter
are passed in, so every rule here is tested with tables (tests/unit/test_decisions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobStatus
from api_contracts.upstream import StatusResponse
from worker.errors import (
    AmbiguousSubmitError,
    DownloadError,
    OutputTooLargeError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    ServiceError,
    StorageError,
    TargetForbiddenError,
    UpstreamAccountError,
    UpstreamExpiredError,
    UpstreamProtocolError,
)
from worker.settings import PollSettings

#: Consecutive malformed status answers tolerated before the job fails.
MAX_PROTOCOL_ERRORS: Final = 5
#: Submit attempts (the first included) on retryable upstream errors.
MAX_SUBMIT_ATTEMPTS: Final = 20
#: Tries on an output URL that answers 404/410/403 before ``output_unavailable``.
MAX_UNAVAILABLE_TRIES: Final = 3
#: Tries on retryable download/result errors before the archive fails.
MAX_ARCHIVE_ATTEMPTS: Final = 10
#: Backoff bounds for transient errors.
BACKOFF_BASE_S: Final = 1.0
BACKOFF_CAP_S: Final = 60.0


@dataclass(frozen=True)
class Reschedule:
    """Run the same step again in ``countdown`` seconds (a new message, seq + 1)."""

    countdown: float
    reason: str
    status: JobStatus | None = None
    queue_position: int | None = None


@dataclass(frozen=True)
class FetchResult:
    """Upstream finished: move to ``archiving`` and fetch the result."""


@dataclass(frozen=True)
class Fail:
    """End the job as ``failed`` with this code and message."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class CancelUpstreamAndFail:
    """Past the deadline while still queued upstream: cancel it there, then fail."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class MarkCancelled:
    """Upstream cancelled the request: the job ends ``cancelled``."""

    message: str


@dataclass(frozen=True)
class PauseAccount(Fail):
    """Upstream refused the account, not this request (UpstreamAccountError: error_code
    400002 balance, 400004 account, 403001 permission, or HTTP 401/403: a bad token). Every
    submit would fail the same way until someone fixes the account.

    A :class:`Fail` subclass, so a step that does not know it still fails the job with
    ``code`` (``upstream_rejected``) and ``message``, as before; the submit step should test
    for it *before* Fail and pause submissions fleet-wide (open a circuit) instead, keeping
    the job queued. ``error_code``: upstream's code, None for a bare 401/403."""

    error_code: int | None = None


@dataclass(frozen=True)
class AmbiguousSubmit(Reschedule):
    """The submit POST was sent but no answer read (AmbiguousSubmitError): upstream may hold,
    and bill, a request whose id we never saw. Submitting again may cost a second generation;
    not submitting may lose the job.

    A :class:`Reschedule` subclass (``reason="ambiguous_submit"``), so a step that does not
    know it submits again after ``countdown``, as it did for any timeout; the submit step
    should test for it *before* Reschedule, count it (like the lease-expiry ambiguous window)
    and follow its setting: resubmit after ``countdown``, or fail the job."""

    reason: str = "ambiguous_submit"


PollDecision = Reschedule | FetchResult | Fail | CancelUpstreamAndFail | MarkCancelled
#: What decide_submit_error returns; test AmbiguousSubmit and PauseAccount first (subclasses).
SubmitDecision = AmbiguousSubmit | Reschedule | PauseAccount | Fail


def backoff(
    attempt: int, jitter: float, *, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S
) -> float:
    """Exponential backoff for the ``attempt``-th retry (1-based), between 50 % and 100 % of
    ``min(cap, base * 2**(attempt-1))``; ``jitter`` in [0, 1) picks where."""
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))


def retry_delay(error: ServiceError, attempt: int, jitter: float) -> float:
    """Wait before retrying after ``error``: upstream's ``Retry-After`` when it sent one (it
    knows its load better than we do), else exponential backoff for this attempt."""
    if isinstance(error, RetryableUpstreamError) and error.retry_after_s is not None:
        return max(0.0, error.retry_after_s)
    return backoff(attempt, jitter)


def poll_interval(elapsed_s: float, poll: PollSettings, jitter: float = 0.5) -> float:
    """Time to the next status check: about 10 % of the time upstream has had the request,
    never above ``max_interval_s``; ``jitter`` in [0, 1) shortens it by up to 10 % so jobs
    submitted together do not poll in lockstep. Jitter only ever shortens: the detection
    delay stays within 10 % of the generation time (and within ``min_interval_s``)."""
    base = min(poll.max_interval_s, max(poll.min_interval_s, 0.1 * max(elapsed_s, 0.0)))
    return base * (1.0 - 0.1 * min(max(jitter, 0.0), 1.0))


def decide_poll(
    *,
    status: JobStatus,
    answer: StatusResponse | ServiceError,
    elapsed_s: float,
    age_s: float,
    deadline_s: float,
    error_streak: int,
    poll: PollSettings,
    jitter: float,
) -> PollDecision:
    """Next step of the poll loop.

    ``status``: the job's status (in_queue or in_progress); ``answer``: upstream's status
    answer or the error the client raised; ``elapsed_s``: since upstream accepted the request;
    ``age_s``: since the job was created; ``error_streak``: consecutive failed checks before
    this one.

    Upstream saying the request id does not exist or expired (UpstreamExpiredError) ends the
    job ``upstream_expired`` with upstream's message, before the deadline is even checked:
    there is nothing left upstream to wait for or to cancel."""
    if isinstance(answer, UpstreamExpiredError):
        return Fail(ErrorCode.UPSTREAM_EXPIRED, expired_text(answer))
    if isinstance(answer, StatusResponse):
        if answer.status == "completed":
            return FetchResult()
        if answer.status == "cancelled":
            return MarkCancelled("upstream cancelled the request")
        if answer.status == "failed":
            return Fail(ErrorCode.GENERATION_FAILED, upstream_error_text(answer.error))
    if age_s >= deadline_s:
        message = f"not finished after {deadline_s:.0f}s (JOB_DEADLINE_S)"
        still_queued = (
            answer.status == "in_queue"
            if isinstance(answer, StatusResponse)
            else status == JobStatus.IN_QUEUE
        )
        if still_queued:
            return CancelUpstreamAndFail(ErrorCode.DEADLINE_EXCEEDED, message)
        return Fail(ErrorCode.DEADLINE_EXCEEDED, message)
    remaining = max(0.5, deadline_s - age_s)
    if isinstance(answer, StatusResponse):
        new_status = JobStatus.IN_QUEUE if answer.status == "in_queue" else JobStatus.IN_PROGRESS
        if status == JobStatus.IN_PROGRESS and new_status == JobStatus.IN_QUEUE:
            # Upstream re-queued a started request: a job never goes backwards, so it stays
            # in_progress (and keeps being polled) until upstream moves on.
            return Reschedule(
                countdown=min(remaining, poll_interval(elapsed_s, poll, jitter)),
                reason="requeued_upstream",
            )
        return Reschedule(
            countdown=min(remaining, poll_interval(elapsed_s, poll, jitter)),
            reason=answer.status,
            status=new_status,
            queue_position=answer.queue_position if answer.status == "in_queue" else None,
        )
    if isinstance(answer, PermanentUpstreamError):
        return Fail(
            ErrorCode.UPSTREAM_REJECTED, f"status check refused ({answer.status_code}): {answer}"
        )
    if isinstance(answer, UpstreamProtocolError):
        if error_streak + 1 >= MAX_PROTOCOL_ERRORS:
            return Fail(ErrorCode.UPSTREAM_PROTOCOL_ERROR, str(answer))
        return Reschedule(min(remaining, backoff(error_streak + 1, jitter)), "protocol_error")
    delay = retry_delay(answer, error_streak + 1, jitter)
    return Reschedule(min(remaining, delay), "transient_error")


def decide_submit_error(
    error: ServiceError, *, attempt: int, age_s: float, deadline_s: float, jitter: float
) -> SubmitDecision:
    """After a failed submit (``attempt`` = tries made so far): retry later, or give up.

    * UpstreamAccountError → :class:`PauseAccount` (a Fail with ``upstream_rejected``): the
      account, not the request, is refused;
    * any other PermanentUpstreamError → Fail ``upstream_rejected``;
    * AmbiguousSubmitError → :class:`AmbiguousSubmit` after the usual retry delay (a
      Reschedule with ``reason="ambiguous_submit"``), within the same bounds as every retry:
      past ``MAX_SUBMIT_ATTEMPTS`` or the deadline it is Fail ``upstream_unavailable``;
    * other retryable errors → Reschedule ``submit_retry``; protocol errors likewise, failing
      ``upstream_protocol_error`` past the bounds.
    """
    if isinstance(error, UpstreamAccountError):
        return PauseAccount(
            ErrorCode.UPSTREAM_REJECTED,
            f"upstream refused the account ({error.status_code}): {error}",
            error_code=error.error_code,
        )
    if isinstance(error, PermanentUpstreamError):
        return Fail(
            ErrorCode.UPSTREAM_REJECTED,
            f"upstream refused the request ({error.status_code}): {error}",
        )
    if isinstance(error, UpstreamProtocolError):
        code = ErrorCode.UPSTREAM_PROTOCOL_ERROR
    else:
        code = ErrorCode.UPSTREAM_UNAVAILABLE
    delay = retry_delay(error, attempt, jitter)
    if attempt >= MAX_SUBMIT_ATTEMPTS or age_s + delay >= deadline_s:
        return Fail(code, f"gave up submitting after {attempt} attempts: {error}")
    if isinstance(error, AmbiguousSubmitError):
        return AmbiguousSubmit(delay)
    return Reschedule(delay, "submit_retry")


def decide_archive_error(
    error: ServiceError,
    *,
    attempt: int,
    failing_for_s: float,
    storage_window_s: float,
    jitter: float,
) -> Reschedule | Fail:
    """After a failed archive step (``attempt`` = failures so far in this run, counting this
    one; ``failing_for_s`` = since the first of them): retry later, or fail the job.

    A result refused because the request id does not exist or expired (UpstreamExpiredError)
    fails ``upstream_expired`` with upstream's message."""
    if isinstance(error, UpstreamExpiredError):
        return Fail(ErrorCode.UPSTREAM_EXPIRED, expired_text(error))
    if isinstance(error, TargetForbiddenError):
        return Fail(ErrorCode.OUTPUT_FORBIDDEN, str(error))
    if isinstance(error, OutputTooLargeError):
        return Fail(ErrorCode.OUTPUT_TOO_LARGE, str(error))
    if isinstance(error, StorageError):
        if failing_for_s >= storage_window_s:
            return Fail(
                ErrorCode.STORAGE_ERROR, f"S3 kept failing for {failing_for_s:.0f}s: {error}"
            )
        return Reschedule(backoff(attempt, jitter, cap=120.0), "storage_retry")
    if isinstance(error, DownloadError) and not error.retryable:
        if attempt >= MAX_UNAVAILABLE_TRIES:
            return Fail(ErrorCode.OUTPUT_UNAVAILABLE, f"output could not be fetched: {error}")
        return Reschedule(backoff(attempt, jitter), "output_unavailable_retry")
    if isinstance(error, PermanentUpstreamError):
        return Fail(ErrorCode.UPSTREAM_REJECTED, f"result refused ({error.status_code}): {error}")
    if attempt >= MAX_ARCHIVE_ATTEMPTS:
        code = (
            ErrorCode.UPSTREAM_PROTOCOL_ERROR
            if isinstance(error, UpstreamProtocolError)
            else ErrorCode.UPSTREAM_UNAVAILABLE
        )
        return Fail(code, f"gave up after {attempt} attempts: {error}")
    return Reschedule(retry_delay(error, attempt, jitter), "archive_retry")


def expired_text(error: UpstreamExpiredError) -> str:
    """A job's message when upstream no longer knows its request: upstream's own words."""
    return error.upstream_message or str(error)


def upstream_error_text(error: object) -> str:
    """Why a job fails when upstream reports its generation failed (from its error object)."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or error
        return f"upstream generation failed: {message}"
    if error:
        return f"upstream generation failed: {error}"
    return "upstream generation failed"
