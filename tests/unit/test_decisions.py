"""Tables for the pure decisions: transitions, poll loop, submit and archive errors."""

from __future__ import annotations

import pytest

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobStatus
from api_contracts.upstream import StatusResponse
from worker.errors import (
    AmbiguousSubmitError,
    DownloadError,
    NotCancellableError,
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
from worker.jobs import decisions as d
from worker.jobs.state import transition_allowed
from worker.settings import PollSettings

S = JobStatus
POLL = PollSettings(initial_delay_s=1, min_interval_s=1, max_interval_s=30)

ORDER = [S.QUEUED, S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS, S.ARCHIVING, S.SUCCEEDED]


@pytest.mark.parametrize(
    ("current", "new", "ok"),
    [
        (S.QUEUED, S.SUBMITTING, True),
        (S.QUEUED, S.CANCELLED, True),
        (S.QUEUED, S.FAILED, True),
        (S.QUEUED, S.IN_QUEUE, False),
        (S.QUEUED, S.QUEUED, True),
        (S.QUEUED, S.SUCCEEDED, False),
        (S.SUBMITTING, S.IN_QUEUE, True),
        (S.SUBMITTING, S.SUBMITTING, True),
        (S.SUBMITTING, S.QUEUED, False),
        (S.IN_QUEUE, S.IN_PROGRESS, True),
        (S.IN_QUEUE, S.ARCHIVING, True),
        (S.IN_QUEUE, S.CANCELLED, True),
        (S.IN_QUEUE, S.SUBMITTING, False),
        (S.IN_PROGRESS, S.IN_QUEUE, False),
        (S.IN_PROGRESS, S.CANCELLED, True),
        (S.IN_PROGRESS, S.ARCHIVING, True),
        (S.ARCHIVING, S.SUCCEEDED, True),
        (S.ARCHIVING, S.IN_PROGRESS, False),
        (S.ARCHIVING, S.CANCELLED, False),
        (S.SUCCEEDED, S.SUCCEEDED, True),
        (S.SUCCEEDED, S.FAILED, False),
        (S.FAILED, S.QUEUED, False),
        (S.CANCELLED, S.SUBMITTING, False),
    ],
)
def test_transitions(current: JobStatus, new: JobStatus, ok: bool) -> None:
    assert transition_allowed(current, new) is ok


def test_never_backwards_along_the_happy_path() -> None:
    for i, later in enumerate(ORDER):
        for earlier in ORDER[:i]:
            assert not transition_allowed(later, earlier), (later, earlier)


def test_final_states_are_final() -> None:
    for final in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert [s for s in S if transition_allowed(final, s)] == [final]


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0, 1.0), (5, 1.0), (10, 1.0), (20, 2.0), (100, 10.0), (299, 29.9), (3000, 30.0)],
)
def test_poll_interval_is_ten_percent_of_elapsed_within_bounds(
    elapsed: float, expected: float
) -> None:
    assert d.poll_interval(elapsed, POLL, jitter=0.0) == pytest.approx(expected)


def test_poll_interval_jitter_only_shortens() -> None:
    assert d.poll_interval(100, POLL, 0.0) == 10.0
    assert 9.0 < d.poll_interval(100, POLL, 0.999) < 9.01
    assert d.poll_interval(0, POLL, 0.0) == 1.0
    assert d.poll_interval(0, POLL, 0.5) == pytest.approx(0.95)
    assert d.poll_interval(1e6, POLL, 0.0) == 30.0
    for elapsed in (0, 3, 50, 299, 5000):
        for jitter in (0.0, 0.3, 0.999):
            got = d.poll_interval(elapsed, POLL, jitter)
            assert got <= max(POLL.min_interval_s, 0.1 * elapsed)
            assert got <= POLL.max_interval_s


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 0.5), (1, 1.0, 1.0), (2, 1.0, 2.0), (4, 1.0, 8.0), (10, 1.0, 60.0), (30, 0.0, 30.0)],
)
def test_backoff(attempt: int, jitter: float, expected: float) -> None:
    assert d.backoff(attempt, jitter) == pytest.approx(expected)


def st(status: str, **kw: object) -> StatusResponse:
    return StatusResponse.model_validate({"status": status, **kw})


def poll(
    answer: StatusResponse | ServiceError,
    *,
    status: JobStatus = S.IN_QUEUE,
    elapsed: float = 10,
    age: float = 12,
    deadline: float = 1800,
    streak: int = 0,
) -> d.PollDecision:
    return d.decide_poll(
        status=status,
        answer=answer,
        elapsed_s=elapsed,
        age_s=age,
        deadline_s=deadline,
        error_streak=streak,
        poll=POLL,
        jitter=0.0,
    )


def test_poll_in_queue_reschedules_with_position() -> None:
    got = poll(st("in_queue", queue_position=4), elapsed=50)
    assert got == d.Reschedule(5.0, "in_queue", S.IN_QUEUE, 4)


def test_poll_in_progress_reschedules_without_position() -> None:
    got = poll(st("in_progress", queue_position=4), elapsed=3)
    assert got == d.Reschedule(1.0, "in_progress", S.IN_PROGRESS, None)


def test_poll_requeued_upstream_never_moves_a_job_backwards() -> None:
    got = poll(st("in_queue", queue_position=2), status=S.IN_PROGRESS, elapsed=50)
    assert got == d.Reschedule(5.0, "requeued_upstream")  # status and position unchanged


def test_poll_completed_fetches_result_even_past_deadline() -> None:
    assert poll(st("completed"), age=99999) == d.FetchResult()


def test_poll_upstream_cancelled() -> None:
    assert isinstance(poll(st("cancelled")), d.MarkCancelled)


def test_poll_upstream_failed() -> None:
    got = poll(st("failed", error={"message": "nsfw"}))
    assert got == d.Fail(ErrorCode.GENERATION_FAILED, "upstream generation failed: nsfw")


def test_deadline_while_queued_cancels_upstream() -> None:
    got = poll(st("in_queue", queue_position=1), age=1800)
    assert isinstance(got, d.CancelUpstreamAndFail)
    assert got.code == ErrorCode.DEADLINE_EXCEEDED


def test_deadline_while_running_fails() -> None:
    got = poll(st("in_progress"), status=S.IN_PROGRESS, age=1801)
    assert isinstance(got, d.Fail)
    assert got.code == ErrorCode.DEADLINE_EXCEEDED


def test_deadline_on_error_uses_known_status() -> None:
    err = RetryableUpstreamError("boom", status_code=503)
    assert isinstance(poll(err, status=S.IN_QUEUE, age=2000), d.CancelUpstreamAndFail)
    assert isinstance(poll(err, status=S.IN_PROGRESS, age=2000), d.Fail)


def test_reschedule_never_past_the_deadline() -> None:
    got = poll(st("in_progress"), elapsed=1000, age=1798)
    assert isinstance(got, d.Reschedule)
    assert got.countdown == 2.0


def test_transient_error_honours_retry_after() -> None:
    got = poll(RetryableUpstreamError("429", status_code=429, retry_after_s=7))
    assert got == d.Reschedule(7.0, "transient_error")


def test_transient_error_backs_off_with_streak() -> None:
    got = poll(RetryableUpstreamError("503", status_code=503), streak=3)
    assert got == d.Reschedule(4.0, "transient_error")


def test_permanent_status_error_fails() -> None:
    got = poll(PermanentUpstreamError("unknown request", status_code=404))
    assert isinstance(got, d.Fail)
    assert got.code == ErrorCode.UPSTREAM_REJECTED
    assert "404" in got.message


def test_protocol_errors_tolerated_a_few_times() -> None:
    err = UpstreamProtocolError("not json")
    assert isinstance(poll(err, streak=0), d.Reschedule)
    assert isinstance(poll(err, streak=d.MAX_PROTOCOL_ERRORS - 2), d.Reschedule)
    got = poll(err, streak=d.MAX_PROTOCOL_ERRORS - 1)
    assert isinstance(got, d.Fail)
    assert got.code == ErrorCode.UPSTREAM_PROTOCOL_ERROR


EXPIRED = UpstreamExpiredError(
    "RunComfy GET /v1/requests/r/status answered 200 with error_code 404001: Request expired",
    upstream_message="Request expired",
)


@pytest.mark.parametrize(
    ("status", "age", "streak"),
    [
        (S.IN_QUEUE, 12, 0),
        (S.IN_PROGRESS, 12, 0),
        (S.IN_QUEUE, 99999, 0),  # past the deadline: nothing to cancel upstream
        (S.IN_PROGRESS, 99999, 0),
        (S.IN_QUEUE, 12, d.MAX_PROTOCOL_ERRORS + 3),
    ],
)
def test_poll_expired_request_fails_with_upstreams_message(
    status: JobStatus, age: float, streak: int
) -> None:
    got = poll(EXPIRED, status=status, age=age, streak=streak)
    assert got == d.Fail(ErrorCode.UPSTREAM_EXPIRED, "Request expired")
    assert type(got) is d.Fail


def test_poll_expired_without_a_message_uses_the_error_text() -> None:
    got = poll(UpstreamExpiredError("RunComfy answered 404 with error_code 404001: (empty)"))
    assert got == d.Fail(
        ErrorCode.UPSTREAM_EXPIRED, "RunComfy answered 404 with error_code 404001: (empty)"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamAccountError("no balance", status_code=400, error_code=400002), d.Fail),
        (PermanentUpstreamError("unknown request", status_code=404), d.Fail),
        (PermanentUpstreamError("other", status_code=400, error_code=400001), d.Fail),
    ],
)
def test_poll_other_permanent_errors_stay_upstream_rejected(
    error: ServiceError, expected: type[d.Fail]
) -> None:
    got = poll(error)
    assert type(got) is expected
    assert isinstance(got, d.Fail) and got.code == ErrorCode.UPSTREAM_REJECTED


def test_poll_ambiguous_error_class_is_just_transient_there() -> None:
    # never raised by status calls; if it were, it is a retryable error like any other
    got = poll(AmbiguousSubmitError("read timeout"), streak=3)
    assert got == d.Reschedule(4.0, "transient_error")


def submit_err(err: ServiceError, attempt: int = 1, age: float = 0) -> d.SubmitDecision:
    return d.decide_submit_error(err, attempt=attempt, age_s=age, deadline_s=1800, jitter=1.0)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
def test_submit_permanent_fails_with_code(code: int) -> None:
    got = submit_err(PermanentUpstreamError("bad prompt", status_code=code))
    assert isinstance(got, d.Fail)
    assert got.code == ErrorCode.UPSTREAM_REJECTED
    assert str(code) in got.message and "bad prompt" in got.message


def test_submit_retryable_honours_retry_after_and_is_bounded() -> None:
    err = RetryableUpstreamError("429", status_code=429, retry_after_s=12)
    assert submit_err(err) == d.Reschedule(12.0, "submit_retry")
    assert submit_err(RetryableUpstreamError("x"), attempt=3) == d.Reschedule(4.0, "submit_retry")
    final = submit_err(err, attempt=d.MAX_SUBMIT_ATTEMPTS)
    assert isinstance(final, d.Fail)
    assert final.code == ErrorCode.UPSTREAM_UNAVAILABLE


@pytest.mark.parametrize(
    ("error", "error_code"),
    [
        (UpstreamAccountError("insufficient balance", status_code=400, error_code=400002), 400002),
        (UpstreamAccountError("user account error", status_code=400, error_code=400004), 400004),
        (UpstreamAccountError("permission denied", status_code=403, error_code=403001), 403001),
        (UpstreamAccountError("bad token", status_code=401), None),
        (UpstreamAccountError("forbidden", status_code=403), None),
    ],
)
@pytest.mark.parametrize("attempt", [1, d.MAX_SUBMIT_ATTEMPTS + 5])
def test_submit_account_error_pauses_the_account(
    error: UpstreamAccountError, error_code: int | None, attempt: int
) -> None:
    got = submit_err(error, attempt=attempt, age=99999)
    assert isinstance(got, d.PauseAccount)
    assert isinstance(got, d.Fail)  # a step that does not know PauseAccount still fails the job
    assert got.code == ErrorCode.UPSTREAM_REJECTED
    assert got.error_code == error_code
    assert str(error) in got.message
    assert str(error.status_code) in got.message


@pytest.mark.parametrize(
    "error",
    [
        PermanentUpstreamError("invalid input", status_code=422),
        PermanentUpstreamError("invalid resource", status_code=400, error_code=400001),
        UpstreamExpiredError("gone", upstream_message="gone"),
        NotCancellableError("running"),
    ],
)
def test_submit_other_permanent_errors_fail_plainly(error: PermanentUpstreamError) -> None:
    got = submit_err(error)
    assert type(got) is d.Fail
    assert got.code == ErrorCode.UPSTREAM_REJECTED


def test_submit_ambiguous_is_its_own_reschedule() -> None:
    err = AmbiguousSubmitError("read timeout after sending")
    got = submit_err(err, attempt=3)
    assert got == d.AmbiguousSubmit(4.0)
    assert isinstance(got, d.Reschedule)  # a step that does not know it submits again
    assert got.reason == "ambiguous_submit"
    assert got.countdown == 4.0
    assert got != d.Reschedule(4.0, "ambiguous_submit")  # distinguishable by type


@pytest.mark.parametrize(
    ("attempt", "age", "expected"),
    [
        (1, 0, d.AmbiguousSubmit(1.0)),
        (d.MAX_SUBMIT_ATTEMPTS - 1, 0, d.AmbiguousSubmit(60.0)),
        (d.MAX_SUBMIT_ATTEMPTS, 0, None),
        (1, 1799.5, None),
    ],
)
def test_submit_ambiguous_is_bounded_like_every_retry(
    attempt: int, age: float, expected: d.AmbiguousSubmit | None
) -> None:
    got = submit_err(AmbiguousSubmitError("read timeout"), attempt=attempt, age=age)
    if expected is not None:
        assert got == expected
    else:
        assert type(got) is d.Fail
        assert got.code == ErrorCode.UPSTREAM_UNAVAILABLE
        assert "read timeout" in got.message


@pytest.mark.parametrize(
    "error",
    [RetryableUpstreamError("connect timeout"), RetryableUpstreamError("503", status_code=503)],
)
def test_submit_plain_retryable_is_not_ambiguous(error: RetryableUpstreamError) -> None:
    got = submit_err(error, attempt=3)
    assert type(got) is d.Reschedule
    assert got == d.Reschedule(4.0, "submit_retry")


def test_submit_retry_never_past_deadline() -> None:
    got = submit_err(RetryableUpstreamError("x", retry_after_s=100), age=1750)
    assert isinstance(got, d.Fail)


def archive_err(err: ServiceError, attempt: int = 1, failing: float = 0) -> d.Reschedule | d.Fail:
    return d.decide_archive_error(
        err, attempt=attempt, failing_for_s=failing, storage_window_s=600, jitter=1.0
    )


def test_archive_errors() -> None:
    gone = DownloadError("404", retryable=False, status_code=404)
    assert isinstance(archive_err(gone, attempt=1), d.Reschedule)
    final = archive_err(gone, attempt=d.MAX_UNAVAILABLE_TRIES)
    assert isinstance(final, d.Fail) and final.code == ErrorCode.OUTPUT_UNAVAILABLE
    assert archive_err(OutputTooLargeError("big")) == d.Fail(ErrorCode.OUTPUT_TOO_LARGE, "big")
    forbidden = archive_err(TargetForbiddenError("10.0.0.1"))
    assert isinstance(forbidden, d.Fail) and forbidden.code == ErrorCode.OUTPUT_FORBIDDEN
    s3 = StorageError("SlowDown")
    assert isinstance(archive_err(s3, attempt=50, failing=599), d.Reschedule)
    s3_final = archive_err(s3, attempt=50, failing=600)
    assert isinstance(s3_final, d.Fail) and s3_final.code == ErrorCode.STORAGE_ERROR
    flaky = DownloadError("reset", retryable=True)
    assert isinstance(archive_err(flaky, attempt=2), d.Reschedule)
    assert isinstance(archive_err(flaky, attempt=d.MAX_ARCHIVE_ATTEMPTS), d.Fail)
    limited = archive_err(RetryableUpstreamError("429", retry_after_s=20))
    assert limited == d.Reschedule(20.0, "archive_retry")


@pytest.mark.parametrize("attempt", [1, d.MAX_ARCHIVE_ATTEMPTS + 1])
def test_archive_expired_result_fails_with_upstreams_message(attempt: int) -> None:
    got = archive_err(EXPIRED, attempt=attempt)
    assert got == d.Fail(ErrorCode.UPSTREAM_EXPIRED, "Request expired")


def test_archive_other_permanent_result_errors_stay_upstream_rejected() -> None:
    got = archive_err(UpstreamAccountError("forbidden", status_code=403))
    assert isinstance(got, d.Fail) and got.code == ErrorCode.UPSTREAM_REJECTED
    got = archive_err(PermanentUpstreamError("bad id", status_code=400, error_code=400001))
    assert isinstance(got, d.Fail) and got.code == ErrorCode.UPSTREAM_REJECTED


def test_retry_after_is_honoured_even_when_shorter_than_backoff() -> None:
    err = RetryableUpstreamError("429", status_code=429, retry_after_s=0.2)
    assert d.retry_delay(err, attempt=6, jitter=1.0) == 0.2
    assert d.retry_delay(RetryableUpstreamError("503"), attempt=6, jitter=1.0) == 32.0
