"""What to do next, as pure functions of (state, upstream answer, attempt, clock).

Tasks gather the facts, call one of these, and act on the value it returns; time and jitter
are passed in, so every rule here is tested with tables (tests/unit/test_decisions.py).
"""

from __future__ import annotations

from collections.abc import Callable
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
from worker.jobs.runtimes import Learned, Samples, Sketch
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
#: On a learned kind, the 10 % rule's jitter shortens an interval by up to 2 %, not 10 %:
#: every shortening is a check the bound did not need (10 % costs about 5 % more checks),
#: and the learned first check already spreads jobs submitted together.
LEARNED_JITTER_SHARE: Final = 0.2
#: A job never seen queued teaches its run time only if the first check that saw it running
#: came within this share of that run time after the submit (its start is known closely).
START_SPREAD_SHARE: Final = 0.25


@dataclass(frozen=True)
class Reschedule:
    """Run the same step again in ``countdown`` seconds (a new message, seq + 1)."""

    countdown: float
    reason: str
    status: JobStatus | None = None
    queue_position: int | None = None
    #: the countdown comes from learned run times (longer than the 10 % rule's)
    learned: bool = False


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
    """The 10 % rule: time to the next status check is about 10 % of the time upstream has
    had the request, never above ``max_interval_s``; ``jitter`` in [0, 1) shortens it by up
    to 10 % so jobs submitted together do not poll in lockstep. Jitter only ever shortens:
    the detection delay stays within 10 % of the generation time (and ``min_interval_s``)."""
    base = min(poll.max_interval_s, max(poll.min_interval_s, 0.1 * max(elapsed_s, 0.0)))
    return base * (1.0 - 0.1 * min(max(jitter, 0.0), 1.0))


@dataclass(frozen=True)
class Observed:
    """What a job's status checks have shown, in seconds since upstream accepted it.

    ``queued_s``: the last check that saw it ``in_queue`` (0: never seen queued, so its run
    counts from the submit); ``started_s``: the first check that saw it running (None: not
    yet). Its run started somewhere in ``(queued_s, started_s]``."""

    elapsed_s: float
    queued_s: float = 0.0
    started_s: float | None = None

    def seen(self, status: str) -> Observed:
        """After a check at ``elapsed_s`` answered ``status``."""
        if status == "in_queue":
            return Observed(self.elapsed_s, self.elapsed_s, self.started_s)
        if self.started_s is None and status in ("in_progress", "completed"):
            return Observed(self.elapsed_s, self.queued_s, self.elapsed_s)
        return self

    @property
    def start_spread(self) -> float:
        """How uncertain the start is (0 when never seen queued: the run counts from 0)."""
        if self.queued_s <= 0 or self.started_s is None:
            return 0.0
        return max(0.0, self.started_s - self.queued_s)


def learned_sketch(sketch: Sketch | None, poll: PollSettings) -> Sketch | None:
    """The sketch if the schedule may trust it: learning on, enough samples, and not many
    jobs finishing before the learned schedule looked (upstream got faster: the window has
    to move on first)."""
    if not poll.learn or sketch is None or sketch.total < poll.learn_min_samples:
        return None
    if sketch.early_share > 3 * poll.learn_quantile:
        return None
    return sketch


def first_check(sketch: Sketch | None, poll: PollSettings) -> tuple[float, bool]:
    """Countdown from submit to the first status check, and whether it is learned: when
    ``learn_quantile`` of earlier jobs of the kind had finished (``sketch``: their total
    times, submit → done; never before ``initial_delay_s``); with no usable sketch,
    ``initial_delay_s``."""
    usable = learned_sketch(sketch, poll)
    if usable is None:
        return poll.initial_delay_s, False
    planned = usable.quantile(poll.learn_quantile)
    if planned <= poll.initial_delay_s:
        return poll.initial_delay_s, False
    return planned, True


def next_check(
    status: JobStatus, seen: Observed, learned: Learned, poll: PollSettings, jitter: float
) -> tuple[float, bool]:
    """Countdown to the next status check of a job still ``status`` (in_queue/in_progress)
    after the checks in ``seen``, and whether it comes from learned timings.

    The 10 % rule (:func:`poll_interval`) is the floor: a job is never checked later than it
    would allow *unless* what was learned says it almost surely cannot have finished yet:

    * ``in_queue``: it has not started, so it cannot finish before now + its run time: the
      next check waits the run time's ``learn_quantile`` (the queue shifts the plan along);
    * running, seen queued before: it finishes at start + run time, its start within
      ``seen.start_spread`` after it was last seen queued: the next check waits until the
      ``learn_quantile`` of that;
    * running, never seen queued: it finishes at submit + total time (queue wait included,
      unseen): the next check waits until the total's ``learn_quantile``;

    past that plan, the 10 % rule. So only jobs faster than that quantile (about
    ``learn_quantile`` of them) can be seen later than 10 % of their run time; slow ones,
    however far from the learned distribution, are on the 10 % rule. ``max_interval_s`` caps
    the rule, not a learned wait: a 10 min generation is not looked at every 30 s for its
    first 6 minutes. On a learned kind the rule's jitter is narrower
    (:data:`LEARNED_JITTER_SHARE`)."""
    total = learned_sketch(learned.total, poll)
    run = learned_sketch(learned.run, poll)
    if total is None and run is None:
        return poll_interval(seen.elapsed_s, poll, jitter), False
    fallback = poll_interval(seen.elapsed_s, poll, jitter * LEARNED_JITTER_SHARE)
    planned = _planned(status, seen, total, run, poll.learn_quantile)
    if planned is None or planned <= fallback:
        return fallback, False
    return planned, True


def _planned(
    status: JobStatus, seen: Observed, total: Sketch | None, run: Sketch | None, q: float
) -> float | None:
    """The learned wait of :func:`next_check` (None: no plan, or past it)."""
    if status == JobStatus.IN_QUEUE:
        return None if run is None else run.quantile(q)
    if seen.queued_s <= 0:
        return None if total is None else total.quantile(q) - seen.elapsed_s
    if run is None or seen.queued_s + run.quantile(q) + seen.start_spread <= seen.elapsed_s:
        return None  # past the plan: no need for the finer quantile
    return seen.queued_s + run.quantile_spread(q, seen.start_spread) - seen.elapsed_s


def learned_samples(seen: Observed, previous_check_s: float, poll: PollSettings) -> Samples:
    """What a finished job teaches its kind (:func:`worker.jobs.runtimes.teach`): it finished
    between the previous check and this one (take the middle), which is its total time. Its
    run time: from the middle of ``(queued_s, started_s]`` (the anchor :func:`next_check`
    plans from) if it was seen queued; if not, from the middle of ``(0, started_s]`` when the
    first check that saw it running came within :data:`START_SPREAD_SHARE` of that run time;
    else unknown (None), as for a job seen queued and then finished, never running.
    ``early`` goes to the sketch that planned the last wait."""
    finished = (max(0.0, previous_check_s) + seen.elapsed_s) / 2
    run_s = None
    if seen.started_s is not None and seen.started_s < seen.elapsed_s:
        run_s = max(0.05, finished - (seen.queued_s + seen.started_s) / 2)
        if seen.queued_s <= 0 and seen.started_s > START_SPREAD_SHARE * run_s:
            run_s = None
    early = found_early(seen, previous_check_s, poll)
    queued = seen.queued_s > 0
    return Samples(
        total_s=max(0.05, finished),
        run_s=run_s,
        total_early=early and not queued,
        run_early=early and queued,
    )


def found_early(seen: Observed, previous_check_s: float, poll: PollSettings) -> bool:
    """Was a job found finished at a check the learned schedule pushed past the 10 % rule?
    (The gap since the previous check is well over what the rule would have allowed.)"""
    gap = seen.elapsed_s - max(0.0, previous_check_s)
    if previous_check_s <= 0:
        allowed = poll.initial_delay_s
    else:
        allowed = poll_interval(previous_check_s, poll, 0.0)
    return gap > 1.25 * allowed + 0.5


@dataclass(frozen=True)
class ScheduleRun:
    """What the schedule did for one job (:func:`follow_schedule`)."""

    calls: int
    delay_s: float
    #: what the poll step would teach its kind
    samples: Samples


def follow_schedule(
    runtime_s: float,
    queue_s: float,
    learned: Learned,
    poll: PollSettings,
    jitter: Callable[[], float],
) -> ScheduleRun:
    """Follow the schedule exactly for a job that waits ``queue_s`` in upstream's queue and
    then runs ``runtime_s``: its status calls, detection delay and learned sample. The same
    functions the poll step calls, with no deadline and no errors (benchmarks, tests)."""
    done_at = queue_s + runtime_s
    countdown, _ = first_check(learned.total, poll)
    seen, previous = Observed(countdown), 0.0
    for calls in range(1, 1_000_000):
        status = "completed" if seen.elapsed_s >= done_at else "in_progress"
        if seen.elapsed_s < queue_s:
            status = "in_queue"
        seen = seen.seen(status)
        if status == "completed":
            return ScheduleRun(
                calls, seen.elapsed_s - done_at, learned_samples(seen, previous, poll)
            )
        job_status = JobStatus.IN_QUEUE if status == "in_queue" else JobStatus.IN_PROGRESS
        countdown, _ = next_check(job_status, seen, learned, poll, jitter())
        previous = seen.elapsed_s
        seen = Observed(seen.elapsed_s + countdown, seen.queued_s, seen.started_s)
    raise RuntimeError("the schedule never reached the end of the job")


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
    seen: Observed | None = None,
    learned: Learned | None = None,
) -> PollDecision:
    """Next step of the poll loop.

    ``status``: the job's status (in_queue or in_progress); ``answer``: upstream's status
    answer or the error the client raised; ``elapsed_s``: since upstream accepted the request;
    ``age_s``: since the job was created; ``error_streak``: consecutive failed checks before
    this one; ``seen``: the checks so far, this one's answer included (:meth:`Observed.seen`;
    default: only ``elapsed_s``); ``learned``: timings learned of the job's kind, which
    stretch the waits while it cannot have finished yet (:func:`next_check`).

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
        seen = seen or Observed(elapsed_s)
        learned = learned or Learned()
        if status == JobStatus.IN_PROGRESS and new_status == JobStatus.IN_QUEUE:
            # Upstream re-queued a started request: a job never goes backwards, so it stays
            # in_progress (and keeps being polled) until upstream moves on.
            wait, planned = next_check(JobStatus.IN_QUEUE, seen, learned, poll, jitter)
            return Reschedule(
                countdown=min(remaining, wait), reason="requeued_upstream", learned=planned
            )
        wait, planned = next_check(new_status, seen, learned, poll, jitter)
        return Reschedule(
            countdown=min(remaining, wait),
            reason=answer.status,
            status=new_status,
            queue_position=answer.queue_position if answer.status == "in_queue" else None,
            learned=planned,
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
