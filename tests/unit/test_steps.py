"""Every job step against the in-memory job store, with a recording publisher, an injected
clock and plain fakes of RunComfy, S3 and webhooks (see ``tests/unit/fakes.py``).

The Redis twin of a few of these is ``tests/integration/test_pipeline_steps.py``; here each
step is run alone, from a job seeded in exactly the state the step expects, and the tests
assert on the stored job, the messages published (with their seq and countdown), the
outside calls made, and the step's Outcome.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api_contracts.errors import ErrorCode
from api_contracts.jobs import (
    JobError,
    JobRequest,
    JobStatus,
    OutputKind,
    WebhookEvent,
    WebhookState,
)
from api_contracts.messages import (
    TASK_ARCHIVE,
    TASK_CANCEL,
    TASK_NOTIFY,
    TASK_POLL,
    TASK_SUBMIT,
    CancelMessage,
    StepMessage,
    SubmitMessage,
)
from api_contracts.upstream import (
    CancelResponse,
    ResultOutput,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from tests.unit.fakes import (
    Clock,
    FakeArchiver,
    FakeServices,
    FakeUpstream,
    FakeWebhooks,
    Recorder,
    archived_output,
)
from worker.errors import (
    DownloadError,
    NotCancellableError,
    OutputTooLargeError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    ServiceError,
    StorageError,
    TargetForbiddenError,
    TransitionRefusedError,
    UpstreamProtocolError,
)
from worker.jobs.admission import Circuit, NoAdmission
from worker.jobs.cancel import cancel_queued
from worker.jobs.handoff import OUTBOX_GRACE_S, Handoff, Outcome, StepResult
from worker.jobs.memory import InMemoryJobStore
from worker.jobs.runtimes import MemoryRuntimes, runtime_kind
from worker.jobs.state import UNCHANGED, JobChange, Lease, Outbox, StoredJob
from worker.jobs.steps import StepContext
from worker.jobs.steps.archive import archive
from worker.jobs.steps.cancel import cancel
from worker.jobs.steps.notify import event_body, notify
from worker.jobs.steps.poll import poll
from worker.jobs.steps.submit import LEASE_MARGIN_S, submit
from worker.queueing.tasks import TASKS
from worker.services.webhooks import DeliveryResult
from worker.settings import DEFAULT_WEBHOOK_RETRY_SCHEDULE, Settings, load_settings

S = JobStatus
HOOK_URL = "https://hooks.example.com/runcomfy"
REQUEST_JSON: dict[str, Any] = {"input": {"prompt": "a lighthouse at dusk", "force_single": True}}
REQUEST = JobRequest.model_validate(REQUEST_JSON)
HOOKED = JobRequest.model_validate({**REQUEST_JSON, "webhook_url": HOOK_URL})
#: The request as the submit task carries it (what ``Handoff.send`` publishes).
PAYLOAD = REQUEST.model_dump(mode="json", by_alias=True)
RID = "req-1"
TTL_S = 600
IN_QUEUE_ANSWER = StatusResponse(status="in_queue", queue_position=3)
IN_PROGRESS_ANSWER = StatusResponse(status="in_progress")


# ------------------------------------------------------------------------------ harness
@dataclass
class World:
    """One step context on fakes, and handles on each of them."""

    ctx: StepContext
    store: InMemoryJobStore
    rec: Recorder
    clock: Clock
    upstream: FakeUpstream
    archiver: FakeArchiver
    webhooks: FakeWebhooks

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def job(self, job_id: str = "j1") -> StoredJob:
        return self.store.load(job_id)


def make_world(**sections: dict[str, Any]) -> World:
    """A world with the brief's settings; nothing is read from this process's environment."""
    settings = load_settings(
        environ={},
        poll={"initial_delay_s": 1, "min_interval_s": 1, "max_interval_s": 30},
        job={"deadline_s": 1800, "ttl_s": TTL_S},
        broker={"visibility_timeout_s": 400},
        runcomfy={"connect_timeout_s": 5, "read_timeout_s": 30},
        s3={"retry_window_s": 900},
        **{"webhook": {"retry_schedule": DEFAULT_WEBHOOK_RETRY_SCHEDULE}, **sections},
    )
    # Whole seconds, so that ``clock + x`` round-trips exactly through the hop arithmetic.
    # Near wall time, because the store stamps records with the wall clock.
    clock = Clock(float(int(time.time())))
    store = InMemoryJobStore(ttl_s=settings.job.ttl_s, deadline_s=1800, clock=clock)
    rec = Recorder()
    services = FakeServices()
    handoff = Handoff(store, rec, max_countdown_s=settings.max_countdown_s, clock=clock)
    ctx = StepContext(
        settings=settings,
        store=store,
        handoff=handoff,
        services=services,
        clock=clock,
        rng=random.Random(0),
    )
    return World(ctx, store, rec, clock, services.upstream, services.archiver, services.webhooks)


@pytest.fixture
def w() -> World:
    return make_world()


def next_jitter(rng: random.Random) -> float:
    """The jitter the next decision will draw from ``rng`` (without drawing it)."""
    twin = random.Random()
    twin.setstate(rng.getstate())
    return twin.random()


def backoff(attempt: int, jitter: float, cap: float = 60.0) -> float:
    """decisions.backoff, restated: 50-100 % of min(cap, 2**(attempt-1))."""
    return min(cap, 2.0 ** (attempt - 1)) * (0.5 + 0.5 * jitter)


# Statuses a seeded job walks through (every write is an allowed transition).
_PATH: dict[JobStatus, tuple[JobStatus, ...]] = {
    S.QUEUED: (),
    S.SUBMITTING: (S.SUBMITTING,),
    S.IN_QUEUE: (S.SUBMITTING, S.IN_QUEUE),
    S.IN_PROGRESS: (S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS),
    S.ARCHIVING: (S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS, S.ARCHIVING),
    S.SUCCEEDED: (S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS, S.ARCHIVING, S.SUCCEEDED),
    S.FAILED: (S.SUBMITTING, S.IN_QUEUE, S.FAILED),
    S.CANCELLED: (S.SUBMITTING, S.IN_QUEUE, S.CANCELLED),
}
_PROMISED = {S.IN_QUEUE: TASK_POLL, S.IN_PROGRESS: TASK_POLL, S.ARCHIVING: TASK_ARCHIVE}


def seed(
    w: World,
    job_id: str,
    status: JobStatus,
    *,
    webhook: bool = False,
    seq: int | None = None,
    attempt: int = 0,
    since: float = 0.0,
    lease: Lease | None = None,
    queue_position: int | None = None,
    submitted_ago_s: float = 0.0,
) -> StoredJob:
    """A job in ``status`` as the previous step would have left it: ``seq`` (default 0 when
    queued, else 3) with the promised message in the outbox, due now."""
    created = datetime.fromtimestamp(w.clock.now, UTC)
    job, _ = w.store.create_if_absent(job_id, HOOKED if webhook else REQUEST, now=created)
    for step in _PATH[status]:
        after = w.store.update(job, JobChange(status=step))
        assert after is not None
        job = after
    seq = (0 if status == S.QUEUED else 3) if seq is None else seq
    task = TASK_NOTIFY if status.is_terminal and webhook else _PROMISED.get(status)
    upstream_knows = S.IN_QUEUE in _PATH[status]
    change = JobChange(
        seq=seq,
        outbox=Outbox(task, seq, due_at=w.clock.now) if task else None,
        attempt=attempt,
        since=since,
        lease=lease,
        queue_position=queue_position,
        request_id=RID if upstream_knows else UNCHANGED,
        submitted_at=(
            created - timedelta(seconds=submitted_ago_s) if upstream_knows else UNCHANGED
        ),
        error=(
            JobError(code=ErrorCode.GENERATION_FAILED, message="seeded")
            if status == S.FAILED
            else UNCHANGED
        ),
    )
    after = w.store.update(job, change)
    assert after is not None
    return after


# ------------------------------------------------------------------------------ submit
def test_submit_posts_once_and_hands_off_the_first_poll(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    assert w.upstream.requests == [("submit", REQUEST.input)]
    job = w.job()
    assert job.status == S.IN_QUEUE
    assert job.record.request_id == RID
    assert job.record.submitted_at is not None
    assert (job.seq, job.lease, job.attempt, job.since) == (1, None, 0, 0.0)
    assert job.outbox == Outbox(TASK_POLL, 1, due_at=w.clock.now + 1.0)
    # POLL_INITIAL_DELAY_S = 1
    assert w.rec.sent == [(TASK_POLL, ["j1", 1], {}, 1.0)]
    assert [e for e in w.store.events if e[0] == "j1"][-2:] == [
        ("j1", "submitting"),
        ("j1", "in_queue"),
    ]


class CircuitAt(NoAdmission):
    """No caps, the account circuit fixed at ``state``; counts ``submitted`` calls."""

    def __init__(self, state: Circuit) -> None:
        self.state = state
        self.submitted_calls = 0

    def gate(self) -> tuple[Circuit, int]:
        return self.state, 0

    def holds_slot(self, job_id: str) -> bool:
        return True  # the probe was admitted

    def submitted(self) -> None:
        self.submitted_calls += 1


@pytest.mark.parametrize(("state", "closes"), [("closed", 0), ("probing", 1)])
def test_only_the_probe_of_a_half_open_circuit_closes_it(
    w: World, state: Circuit, closes: int
) -> None:
    admission = CircuitAt(state)
    w.ctx.handoff.admission = admission
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    assert admission.submitted_calls == closes


def test_submit_message_creates_its_job_when_the_producer_did_not(w: World) -> None:
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))

    result = TASKS[TASK_SUBMIT](w.ctx, "t1", ("j1", REQUEST_JSON), {})

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    job = w.job()
    assert job.record.request == REQUEST
    assert job.record.webhook is None
    assert w.store.events == [("j1", "queued"), ("j1", "submitting"), ("j1", "in_queue")]
    assert w.rec.sent == [(TASK_POLL, ["j1", 1], {}, 1.0)]


def test_a_submitting_job_holds_a_lease_long_enough_for_the_http_call(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    leases: list[Lease | None] = []

    class Peeking(FakeUpstream):
        def submit(self, inp: Any) -> SubmitResponse:
            leases.append(w.job().lease)
            return SubmitResponse(request_id=RID)

    w.ctx.services = FakeServices(upstream=Peeking())
    submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    # the client's whole budget (pool + connect 2x5 s, write + read 2x30 s) + margin
    assert leases == [Lease("t1", w.clock.now + 70.0 + LEASE_MARGIN_S)]
    assert w.job().lease is None


def test_duplicate_submits_never_post_again(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))
    submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")
    w.rec.sent.clear()

    # The same message again, early: stale and dropped; the due index keeps the promise.
    again = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t2")
    assert again == StepResult(Outcome.STALE, "j1")
    assert w.rec.sent == []
    assert w.store.due_at["j1"] == w.clock.now + 1.0 + OUTBOX_GRACE_S
    # A message carrying the current seq finds the request id stored.
    current = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST, seq=1), owner="t3")
    assert current == StepResult(Outcome.ALREADY_SUBMITTED, "j1")
    assert w.upstream.calls["submit"] == 1
    assert w.job().seq == 1


@pytest.mark.parametrize(
    ("error", "seeded_attempt", "countdown"),
    [
        # upstream's Retry-After wins
        (RetryableUpstreamError("429", status_code=429, retry_after_s=7.0), 0, lambda j: 7.0),
        (RetryableUpstreamError("read timeout"), 0, lambda j: backoff(1, j)),
        (RetryableUpstreamError("503", status_code=503), 3, lambda j: backoff(4, j)),
        (UpstreamProtocolError("no request_id in 200 answer"), 0, lambda j: backoff(1, j)),
    ],
)
def test_submit_retryable_error_hands_off_a_retry(
    w: World, error: ServiceError, seeded_attempt: int, countdown: Any
) -> None:
    seed(w, "j1", S.QUEUED, attempt=seeded_attempt)
    w.upstream.on_submit.set(error)
    delay = countdown(next_jitter(w.ctx.rng))

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert result == StepResult(Outcome.RETRY, "j1")
    job = w.job()
    assert job.status == S.SUBMITTING
    assert (job.lease, job.attempt, job.seq) == (None, seeded_attempt + 1, 1)
    assert job.record.request_id is None
    assert job.outbox == Outbox(TASK_SUBMIT, 1, due_at=w.clock.now + delay)
    assert w.rec.sent == [(TASK_SUBMIT, ["j1", PAYLOAD], {"seq": 1}, delay)]
    assert w.upstream.calls["submit"] == 1


def test_submit_retry_message_submits_and_resets_the_attempts(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(RetryableUpstreamError("503", status_code=503, retry_after_s=2.0))
    submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")
    (task, args, kwargs, _) = w.rec.sent.pop()
    w.clock.advance(2.0)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))

    result = TASKS[task](w.ctx, "t2", tuple(args), kwargs)

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    job = w.job()
    assert (job.status, job.record.request_id, job.attempt, job.seq) == (S.IN_QUEUE, RID, 0, 2)
    assert job.record.notes == []  # a retry after a clean failure is not ambiguous
    assert w.store.counters["ambiguous_submits"] == 0
    assert w.rec.sent == [(TASK_POLL, ["j1", 2], {}, 1.0)]
    assert w.upstream.calls["submit"] == 2


@pytest.mark.parametrize(
    ("error", "seeded_attempt", "code"),
    [
        (
            PermanentUpstreamError("prompt rejected", status_code=422),
            0,
            ErrorCode.UPSTREAM_REJECTED,
        ),
        (PermanentUpstreamError("bad token", status_code=401), 0, ErrorCode.UPSTREAM_REJECTED),
        # the 20th attempt is the last
        (RetryableUpstreamError("503", status_code=503), 19, ErrorCode.UPSTREAM_UNAVAILABLE),
        (UpstreamProtocolError("garbage"), 19, ErrorCode.UPSTREAM_PROTOCOL_ERROR),
        # a wait that ends past the deadline is not worth waiting for
        (
            RetryableUpstreamError("429", status_code=429, retry_after_s=1800.0),
            0,
            ErrorCode.UPSTREAM_UNAVAILABLE,
        ),
    ],
)
def test_submit_gives_up_and_fails_the_job(
    w: World, error: ServiceError, seeded_attempt: int, code: ErrorCode
) -> None:
    seed(w, "j1", S.QUEUED, attempt=seeded_attempt)
    w.upstream.on_submit.set(error)

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert result == StepResult(Outcome.FAILED, "j1")
    job = w.job()
    assert job.status == S.FAILED
    assert job.record.error is not None
    assert job.record.error.code == code
    assert str(error) in job.record.error.message
    assert (job.lease, job.seq, job.outbox) == (None, 1, None)
    assert job.record.finished_at is not None
    assert w.store.ttls == {"j1": TTL_S}
    assert w.rec.sent == []
    assert w.upstream.calls["submit"] == 1


def test_submit_failure_of_a_job_with_a_webhook_hands_off_notify(w: World) -> None:
    seed(w, "j1", S.QUEUED, webhook=True)
    w.upstream.on_submit.set(PermanentUpstreamError("prompt rejected", status_code=422))

    assert submit(w.ctx, SubmitMessage(job_id="j1", request=HOOKED), owner="t1").outcome == (
        Outcome.FAILED
    )
    job = w.job()
    assert (job.status, job.lease, job.seq) == (S.FAILED, None, 1)
    assert job.outbox == Outbox(TASK_NOTIFY, 1, due_at=w.clock.now)
    assert w.rec.sent == [(TASK_NOTIFY, ["j1", 1], {}, 0.0)]


def test_submit_defers_to_a_live_lease_held_by_another_delivery(w: World) -> None:
    before = seed(w, "j1", S.SUBMITTING, seq=0, lease=Lease("t-live", w.clock.now + 60))

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t-other")

    assert result == StepResult(Outcome.SUBMIT_IN_PROGRESS_ELSEWHERE, "j1")
    assert w.store.jobs["j1"] == before
    assert w.upstream.calls == {}
    assert w.rec.sent == []
    assert w.store.counters["ambiguous_submits"] == 0


@pytest.mark.parametrize(
    ("holder", "until_in_s", "owner"),
    [
        ("t-dead", -1.0, "t-new"),  # a dead worker's lease ran out; another delivery
        ("t-dead", -1.0, "t-dead"),  # acks_late redelivery of the very same message
        ("t1", 60.0, "t1"),  # the holder itself comes back while its lease is live
    ],
)
def test_submit_after_an_interrupted_submit_is_ambiguous_counted_and_noted(
    w: World, holder: str, until_in_s: float, owner: str
) -> None:
    seed(w, "j1", S.SUBMITTING, seq=0, lease=Lease(holder, w.clock.now + until_in_s))
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))

    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner=owner)

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    assert w.store.counters["ambiguous_submits"] == 1
    job = w.job()
    assert len(job.record.notes) == 1
    assert job.record.notes[0].startswith("ambiguous_submit")
    assert (job.status, job.record.request_id, job.lease) == (S.IN_QUEUE, RID, None)
    assert w.upstream.calls["submit"] == 1
    assert w.rec.sent == [(TASK_POLL, ["j1", 1], {}, 1.0)]


@pytest.mark.parametrize(
    ("later_s", "expected"),
    [
        # before the promised poll is overdue: dropped (the due index keeps the promise)
        (0.0, None),
        (10.0, None),
        # overdue (due 1 s after the hand-off, plus the grace): republish the promised poll
        (1.0 + OUTBOX_GRACE_S, (TASK_POLL, ["j1", 1], {}, 0.0)),
        (3600.0, (TASK_POLL, ["j1", 1], {}, 0.0)),
    ],
)
def test_lost_publish_is_recovered_by_the_redelivered_submit(
    w: World, later_s: float, expected: tuple[Any, ...] | None
) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))
    w.rec.fail_next = True
    with pytest.raises(ConnectionError):
        submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")
    assert w.rec.sent == []
    job = w.job()  # written, never published
    assert (job.status, job.seq, job.outbox) == (
        S.IN_QUEUE,
        1,
        Outbox(TASK_POLL, 1, due_at=w.clock.now + 1.0),
    )

    w.clock.advance(later_s)
    again = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert again == StepResult(Outcome.STALE, "j1")
    assert w.rec.sent == ([expected] if expected else [])
    assert w.upstream.calls["submit"] == 1
    assert w.job().version == job.version  # republishing writes nothing
    # either way the promise is in the due index: overdue 1 s + grace after the hand-off
    assert w.store.due_at["j1"] == job.read_at + 1.0 + OUTBOX_GRACE_S


# ------------------------------------------------------------------------------ poll
@pytest.mark.parametrize(
    ("status", "answer", "new_status", "queue_position"),
    [
        (S.IN_QUEUE, IN_QUEUE_ANSWER, S.IN_QUEUE, 3),
        (S.IN_QUEUE, IN_PROGRESS_ANSWER, S.IN_PROGRESS, None),
        (S.IN_PROGRESS, IN_PROGRESS_ANSWER, S.IN_PROGRESS, None),
    ],
)
def test_poll_reschedules_with_the_next_seq(
    w: World,
    status: JobStatus,
    answer: StatusResponse,
    new_status: JobStatus,
    queue_position: int | None,
) -> None:
    seed(w, "j1", status, seq=1, attempt=2, queue_position=9)
    w.upstream.on_status.set(answer)
    jitter = next_jitter(w.ctx.rng)

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1))

    assert result == StepResult(Outcome.RESCHEDULED, "j1")
    assert w.upstream.requests == [("status", RID)]
    [(task, args, kwargs, countdown)] = w.rec.sent
    assert (task, args, kwargs) == (TASK_POLL, ["j1", 2], {})
    # just submitted: POLL_MIN_INTERVAL_S, shortened by up to 10 % of jitter
    assert countdown == pytest.approx(1.0 * (1 - 0.1 * jitter))
    job = w.job()
    assert (job.status, job.record.queue_position) == (new_status, queue_position)
    assert (job.seq, job.record.status_calls, job.attempt) == (2, 1, 0)
    assert job.outbox == Outbox(TASK_POLL, 2, due_at=w.clock.now + countdown)


@pytest.mark.parametrize(
    ("submitted_ago_s", "base_s"),
    [(5.0, 1.0), (200.0, 20.0), (290.0, 29.0), (3000.0, 30.0)],
)
def test_poll_interval_is_a_tenth_of_the_time_upstream_has_had_it(
    w: World, submitted_ago_s: float, base_s: float
) -> None:
    seed(w, "j1", S.IN_PROGRESS, seq=1, submitted_ago_s=submitted_ago_s)
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)
    jitter = next_jitter(w.ctx.rng)

    poll(w.ctx, StepMessage(job_id="j1", seq=1))

    [(_, _, _, countdown)] = w.rec.sent
    assert countdown == pytest.approx(base_s * (1 - 0.1 * jitter))


def test_poll_never_waits_past_the_deadline(w: World) -> None:
    seed(w, "j1", S.IN_PROGRESS, seq=1, submitted_ago_s=3000)
    w.clock.advance(1800 - 0.25)  # 0.25 s left: the shortest wait is half a second
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)

    assert poll(w.ctx, StepMessage(job_id="j1", seq=1)).outcome == Outcome.RESCHEDULED
    assert w.rec.sent == [(TASK_POLL, ["j1", 2], {}, 0.5)]


def test_poll_interval_follows_the_injected_clock(w: World) -> None:
    job = seed(w, "j1", S.IN_PROGRESS, seq=1)
    at_clock = datetime.fromtimestamp(w.clock.now, UTC)
    job = w.store.update(job, JobChange(submitted_at=at_clock)) or job
    w.clock.advance(200)  # upstream has had it for 200 s by the step's clock
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)
    jitter = next_jitter(w.ctx.rng)

    poll(w.ctx, StepMessage(job_id="j1", seq=job.seq))

    [(_, _, _, countdown)] = w.rec.sent
    assert countdown == pytest.approx(20.0 * (1 - 0.1 * jitter))


def learned_world(samples: list[float]) -> tuple[World, MemoryRuntimes]:
    world = make_world()
    book = MemoryRuntimes()
    kind = runtime_kind(world.settings.runcomfy.model_id, REQUEST.input)
    for seconds in samples:
        book.learn(kind, seconds, early=False)
    world.ctx.runtimes = book
    return world, book


def test_a_check_that_changes_nothing_is_a_check_only_write(w: World) -> None:
    seed(w, "j1", S.IN_PROGRESS, seq=1, submitted_ago_s=50)
    events = len(w.store.events)
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)

    assert poll(w.ctx, StepMessage(job_id="j1", seq=1)).outcome == Outcome.RESCHEDULED

    assert w.store.check_writes == 1 and len(w.store.events) == events  # no event
    job = w.job()
    assert (job.seq, job.record.status_calls, job.checked_ts) == (2, 1, w.clock.now)


def test_a_status_change_is_a_full_write_with_the_check_marks(w: World) -> None:
    seed(w, "j1", S.IN_QUEUE, seq=1, queue_position=2, submitted_ago_s=3)
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)

    poll(w.ctx, StepMessage(job_id="j1", seq=1))

    assert w.store.check_writes == 0
    job = w.job()
    assert job.status == S.IN_PROGRESS and job.started_ts == w.clock.now
    assert job.queued_ts == 0.0  # never seen queued by a check


def test_poll_waits_for_the_learned_low_quantile_of_a_known_kind() -> None:
    w, book = learned_world([20.0 + i * 0.1 for i in range(100)])  # 20-30 s, all of them
    seed(w, "j1", S.IN_PROGRESS, seq=1, submitted_ago_s=2)
    w.upstream.on_status.set(IN_PROGRESS_ANSWER)

    poll(w.ctx, StepMessage(job_id="j1", seq=1))

    [(_, _, _, countdown)] = w.rec.sent
    kind = runtime_kind(w.settings.runcomfy.model_id, REQUEST.input)
    sketch = book.sketch(kind)
    assert sketch is not None
    low = sketch.quantile(w.settings.poll.learn_quantile)
    assert 19.5 < low < 21.5 and countdown == pytest.approx(low - 2.0, abs=0.01)


def test_submit_plans_the_first_check_from_learned_run_times() -> None:
    w, _ = learned_world([40.0] * 60)
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID, status="in_queue"))

    submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    [(task, _, _, countdown)] = w.rec.sent
    assert task == TASK_POLL and countdown == pytest.approx(40.0, rel=0.05)


def test_a_completed_generation_teaches_its_kind() -> None:
    w, book = learned_world([])
    job = seed(w, "j1", S.IN_PROGRESS, seq=1, submitted_ago_s=30)
    w.store.update(job, JobChange(checked_ts=w.clock.now - 2.0))  # last check 2 s ago
    w.upstream.on_status.set(StatusResponse(status="completed"))

    assert poll(w.ctx, StepMessage(job_id="j1", seq=1)).outcome == Outcome.COMPLETED

    sketch = book.sketch(runtime_kind(w.settings.runcomfy.model_id, REQUEST.input))
    assert sketch is not None and sketch.total == 1
    assert sketch.quantile(0.5) == pytest.approx(29.0, rel=0.05)  # between the checks


def test_poll_completed_hands_off_archive(w: World) -> None:
    seed(w, "j1", S.IN_PROGRESS, seq=4, attempt=1, since=w.clock.now - 5)
    w.upstream.on_status.set(StatusResponse(status="completed"))

    result = poll(w.ctx, StepMessage(job_id="j1", seq=4))

    assert result == StepResult(Outcome.COMPLETED, "j1")
    assert w.rec.sent == [(TASK_ARCHIVE, ["j1", 5], {}, 0.0)]
    job = w.job()
    assert (job.status, job.seq, job.attempt, job.since) == (S.ARCHIVING, 5, 0, 0.0)
    assert (job.record.status_calls, job.record.queue_position) == (1, None)
    assert job.outbox == Outbox(TASK_ARCHIVE, 5, due_at=w.clock.now)


@pytest.mark.parametrize("webhook", [False, True], ids=["no_webhook", "webhook"])
@pytest.mark.parametrize(
    ("answer", "seeded_attempt", "outcome", "status", "code", "message"),
    [
        (
            StatusResponse(status="cancelled"),
            0,
            Outcome.CANCELLED,
            S.CANCELLED,
            ErrorCode.UPSTREAM_CANCELLED,
            "upstream cancelled the request",
        ),
        (
            StatusResponse(status="failed", error={"message": "nsfw filter"}),
            0,
            Outcome.FAILED,
            S.FAILED,
            ErrorCode.GENERATION_FAILED,
            "upstream generation failed: nsfw filter",
        ),
        (
            PermanentUpstreamError("no such request", status_code=404),
            0,
            Outcome.FAILED,
            S.FAILED,
            ErrorCode.UPSTREAM_REJECTED,
            "status check refused (404): no such request",
        ),
        (  # the fifth malformed answer in a row
            UpstreamProtocolError("status 'weird' unknown"),
            4,
            Outcome.FAILED,
            S.FAILED,
            ErrorCode.UPSTREAM_PROTOCOL_ERROR,
            "status 'weird' unknown",
        ),
    ],
)
def test_poll_final_answers_finish_the_job(
    w: World,
    webhook: bool,
    answer: StatusResponse | ServiceError,
    seeded_attempt: int,
    outcome: Outcome,
    status: JobStatus,
    code: ErrorCode,
    message: str,
) -> None:
    seed(w, "j1", S.IN_QUEUE, seq=2, webhook=webhook, attempt=seeded_attempt, queue_position=1)
    w.upstream.on_status.set(answer)

    result = poll(w.ctx, StepMessage(job_id="j1", seq=2))

    assert result == StepResult(outcome, "j1")
    job = w.job()
    assert job.status == status
    assert job.record.error == JobError(code=code, message=message)
    assert (job.record.status_calls, job.record.queue_position, job.seq) == (1, None, 3)
    assert w.store.ttls == {"j1": TTL_S}
    assert w.upstream.calls == {"status": 1}  # no upstream cancel
    if webhook:
        assert job.outbox == Outbox(TASK_NOTIFY, 3, due_at=w.clock.now)
        assert w.rec.sent == [(TASK_NOTIFY, ["j1", 3], {}, 0.0)]
    else:
        assert job.outbox is None
        assert w.rec.sent == []


@pytest.mark.parametrize(
    ("status", "answer", "cancel_answer", "upstream_cancels"),
    [
        # still queued upstream: cancel it there (it would run for nobody), then fail
        (S.IN_QUEUE, IN_QUEUE_ANSWER, CancelResponse(status="cancelled"), 1),
        # no answer: the job's own status says it is still queued
        (S.IN_QUEUE, RetryableUpstreamError("timeout"), CancelResponse(status="cancelled"), 1),
        # the cancel is best effort: the job fails either way
        (S.IN_QUEUE, IN_QUEUE_ANSWER, RetryableUpstreamError("503", status_code=503), 1),
        # running upstream cannot be cancelled: fail without trying
        (S.IN_QUEUE, IN_PROGRESS_ANSWER, None, 0),
        (S.IN_PROGRESS, IN_PROGRESS_ANSWER, None, 0),
        (S.IN_PROGRESS, RetryableUpstreamError("timeout"), None, 0),
    ],
)
def test_poll_past_the_deadline_fails_the_job(
    w: World,
    status: JobStatus,
    answer: StatusResponse | ServiceError,
    cancel_answer: CancelResponse | ServiceError | None,
    upstream_cancels: int,
) -> None:
    seed(w, "j1", status, seq=1)
    w.clock.advance(1800)  # JOB_DEADLINE_S after the job was created
    w.upstream.on_status.set(answer)
    if cancel_answer is not None:
        w.upstream.on_cancel.set(cancel_answer)

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1))

    assert result == StepResult(Outcome.FAILED, "j1")
    job = w.job()
    assert job.status == S.FAILED
    assert job.record.error == JobError(
        code=ErrorCode.DEADLINE_EXCEEDED, message="not finished after 1800s (JOB_DEADLINE_S)"
    )
    assert w.upstream.calls["cancel"] == upstream_cancels
    assert ("cancel", RID) in w.upstream.requests or upstream_cancels == 0
    assert w.rec.sent == []


def test_poll_past_the_deadline_still_archives_a_completed_generation(w: World) -> None:
    seed(w, "j1", S.IN_PROGRESS, seq=1)
    w.clock.advance(5000)
    w.upstream.on_status.set(StatusResponse(status="completed"))

    assert poll(w.ctx, StepMessage(job_id="j1", seq=1)).outcome == Outcome.COMPLETED
    assert w.job().status == S.ARCHIVING
    assert w.rec.sent == [(TASK_ARCHIVE, ["j1", 2], {}, 0.0)]


@pytest.mark.parametrize(
    ("error", "seeded_attempt", "countdown"),
    [
        (RetryableUpstreamError("503", status_code=503, retry_after_s=5.0), 0, lambda j: 5.0),
        (RetryableUpstreamError("read timeout"), 2, lambda j: backoff(3, j)),
        (UpstreamProtocolError("malformed JSON"), 3, lambda j: backoff(4, j)),
    ],
)
def test_poll_status_errors_reschedule_and_count_the_streak(
    w: World, error: ServiceError, seeded_attempt: int, countdown: Any
) -> None:
    seed(w, "j1", S.IN_QUEUE, seq=1, attempt=seeded_attempt, queue_position=7)
    w.upstream.on_status.set(error)
    delay = countdown(next_jitter(w.ctx.rng))

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1))

    assert result == StepResult(Outcome.RESCHEDULED, "j1")
    assert w.rec.sent == [(TASK_POLL, ["j1", 2], {}, delay)]
    job = w.job()
    # what we knew stays: status and queue position are not guessed from an error
    assert (job.status, job.record.queue_position) == (S.IN_QUEUE, 7)
    assert (job.attempt, job.seq, job.record.status_calls) == (seeded_attempt + 1, 2, 1)


def test_poll_of_a_running_job_that_upstream_reports_queued_again_keeps_polling(
    w: World,
) -> None:
    # e.g. after a refused cancel recorded in_progress, or a requeued serverless request
    seed(w, "j1", S.IN_PROGRESS, seq=1)
    w.upstream.on_status.set(StatusResponse(status="in_queue", queue_position=1))

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1))

    assert result.outcome == Outcome.RESCHEDULED
    assert [(t, a) for t, a, _, _ in w.rec.sent] == [(TASK_POLL, ["j1", 2])]
    assert w.job().seq == 2
    assert w.job().status == S.IN_PROGRESS  # never backwards


@pytest.mark.parametrize("msg_seq", [0, 1, 4, 99])
def test_stale_poll_does_nothing(w: World, msg_seq: int) -> None:
    before = seed(w, "j1", S.IN_QUEUE, seq=3)  # outbox: poll seq 3, due now

    result = poll(w.ctx, StepMessage(job_id="j1", seq=msg_seq))

    assert result == StepResult(Outcome.STALE, "j1")
    assert w.upstream.calls == {}
    assert w.rec.sent == []
    assert w.store.jobs["j1"] == before


@pytest.mark.parametrize(
    ("later_s", "expected"),
    [
        (0.0, None),  # a duplicate, or too early to tell: the due index keeps the promise
        (OUTBOX_GRACE_S, (TASK_POLL, ["j1", 3], {}, 0.0)),  # overdue: republish it now
    ],
)
def test_poll_just_before_a_hand_off_is_a_duplicate_or_a_lost_publish(
    w: World, later_s: float, expected: tuple[Any, ...] | None
) -> None:
    before = seed(w, "j1", S.IN_QUEUE, seq=3)  # outbox: poll seq 3, due now
    w.clock.advance(later_s)

    result = poll(w.ctx, StepMessage(job_id="j1", seq=2))

    assert result == StepResult(Outcome.STALE, "j1")
    assert w.rec.sent == ([expected] if expected else [])
    assert w.upstream.calls == {}
    assert w.store.jobs["j1"] == before


@pytest.mark.parametrize(
    ("status", "task", "step", "outcome"),
    [
        (S.ARCHIVING, TASK_POLL, poll, Outcome.NOT_POLLING),
        (S.SUCCEEDED, TASK_POLL, poll, Outcome.NOT_POLLING),
        (S.IN_PROGRESS, TASK_ARCHIVE, archive, Outcome.NOT_ARCHIVING),
        (S.CANCELLED, TASK_ARCHIVE, archive, Outcome.NOT_ARCHIVING),
    ],
)
def test_current_message_for_a_job_elsewhere_does_nothing(
    w: World, status: JobStatus, task: str, step: Any, outcome: Outcome
) -> None:
    before = seed(w, "j1", status, seq=3)

    assert step(w.ctx, StepMessage(job_id="j1", seq=3)) == StepResult(outcome, "j1")
    assert w.upstream.calls == {}
    assert w.rec.sent == []
    assert w.store.jobs["j1"] == before


def test_poll_of_an_unknown_job_is_stale(w: World) -> None:
    assert poll(w.ctx, StepMessage(job_id="nope", seq=1)) == StepResult(Outcome.STALE, "nope")
    assert w.store.jobs == {}
    assert w.rec.sent == []


@pytest.mark.parametrize(
    ("not_before_in_s", "kwargs", "countdown"),
    [
        (5000.0, {"not_before": 5000.0}, 100.0),  # hops: BROKER_VISIBILITY_TIMEOUT_S / 4
        (100.5, {"not_before": 100.5}, 100.0),
        (50.0, {}, 50.0),  # the last hop needs no not_before
        (0.75, {}, 0.75),
    ],
)
def test_poll_with_not_before_in_the_future_is_sent_on(
    w: World, not_before_in_s: float, kwargs: dict[str, float], countdown: float
) -> None:
    before = seed(w, "j1", S.IN_QUEUE, seq=1)
    not_before = w.clock.now + not_before_in_s
    expected_kwargs = {k: w.clock.now + v for k, v in kwargs.items()}

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1, not_before=not_before))

    assert result == StepResult(Outcome.DEFERRED, "j1")
    assert w.rec.sent == [(TASK_POLL, ["j1", 1], expected_kwargs, countdown)]
    assert w.ctx.settings.max_countdown_s == 100.0
    if kwargs:
        assert w.rec.sent[0][2]["not_before"] == not_before  # kept, exactly
    assert w.upstream.calls == {}
    assert w.store.jobs["j1"] == before


@pytest.mark.parametrize("not_before_in_s", [0.5, 0.0, -60.0])
def test_poll_whose_not_before_has_come_runs(w: World, not_before_in_s: float) -> None:
    seed(w, "j1", S.IN_QUEUE, seq=1)
    w.upstream.on_status.set(IN_QUEUE_ANSWER)

    result = poll(w.ctx, StepMessage(job_id="j1", seq=1, not_before=w.clock.now + not_before_in_s))

    assert result == StepResult(Outcome.RESCHEDULED, "j1")
    assert w.upstream.calls == {"status": 1}
    assert [(t, a, k) for t, a, k, _ in w.rec.sent] == [(TASK_POLL, ["j1", 2], {})]


# ------------------------------------------------------------------------------ malformed
@pytest.mark.parametrize("task", [TASK_POLL, TASK_ARCHIVE, TASK_NOTIFY])
@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((), {}, None),
        (("bad id!",), {}, None),
        (("bad id!", 1), {}, None),
        ((42, 1), {}, None),
        (("j8", "one"), {}, "j8"),
        (("j8", 1, 2), {}, "j8"),
        (("j8",), {}, "j8"),  # missing seq
        ((), {"job_id": "j8"}, "j8"),  # missing seq, by keyword
        (("j8", -1), {}, "j8"),
        (("j8", 1), {"seq": 1}, "j8"),  # seq twice
        (("j8", 1), {"not_before": "later"}, "j8"),
        (("j8", 1), {"priority": 9}, "j8"),
    ],
)
def test_malformed_step_messages_fail_the_job_they_name(
    w: World, task: str, args: tuple[Any, ...], kwargs: dict[str, Any], named: str | None
) -> None:
    result = TASKS[task](w.ctx, "task-id", args, kwargs)

    assert result == StepResult(Outcome.MALFORMED, named)
    assert w.rec.sent == []
    assert w.store.counters["malformed_messages"] == 1
    assert w.upstream.calls == {}
    if named is None:
        assert w.store.jobs == {}
        return
    job = w.job(named)
    assert job.status == S.FAILED
    assert job.record.request is None
    assert job.record.error is not None
    assert job.record.error.code == ErrorCode.MALFORMED_MESSAGE
    assert job.record.error.message.startswith(f"malformed {task} message")
    assert w.store.ttls == {named: TTL_S}


@pytest.mark.parametrize("webhook", [False, True], ids=["no_webhook", "webhook"])
def test_malformed_message_fails_the_live_job_it_names(w: World, webhook: bool) -> None:
    seed(w, "j9", S.IN_QUEUE, seq=1, webhook=webhook)

    result = TASKS[TASK_POLL](w.ctx, "task-id", ("j9", "one"), {})

    assert result == StepResult(Outcome.MALFORMED, "j9")
    job = w.job("j9")
    assert job.status == S.FAILED
    assert job.record.error is not None
    assert job.record.error.code == ErrorCode.MALFORMED_MESSAGE
    assert job.record.request == (HOOKED if webhook else REQUEST)
    assert w.rec.sent == ([(TASK_NOTIFY, ["j9", 2], {}, 0.0)] if webhook else [])


def test_malformed_message_leaves_a_final_job_alone(w: World) -> None:
    before = seed(w, "j9", S.SUCCEEDED)

    assert TASKS[TASK_ARCHIVE](w.ctx, "task-id", ("j9",), {}).outcome == Outcome.MALFORMED
    assert w.store.jobs["j9"] == before
    assert w.store.counters["malformed_messages"] == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "named", "code"),
    [
        (("j8", {"input": {"prompt": ""}}), {}, "j8", ErrorCode.INVALID_REQUEST),
        (("j8", {"input": {"prompt": "x", "size": "1x1"}}), {}, "j8", ErrorCode.INVALID_REQUEST),
        (("j8",), {}, "j8", ErrorCode.MALFORMED_MESSAGE),  # no request
        (("j8", REQUEST_JSON), {"seq": "x"}, "j8", ErrorCode.MALFORMED_MESSAGE),
        (("j8", REQUEST_JSON, 0), {}, "j8", ErrorCode.MALFORMED_MESSAGE),
        (("bad id!", REQUEST_JSON), {}, None, ErrorCode.MALFORMED_MESSAGE),
        ((), {}, None, ErrorCode.MALFORMED_MESSAGE),
    ],
)
def test_malformed_submit_messages_fail_the_job_without_posting(
    w: World,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    named: str | None,
    code: ErrorCode,
) -> None:
    result = TASKS[TASK_SUBMIT](w.ctx, "t1", args, kwargs)

    assert result == StepResult(Outcome.MALFORMED, named)
    assert w.upstream.calls == {}
    assert w.rec.sent == []
    if named is None:
        assert w.store.jobs == {}
    else:
        error = w.job(named).record.error
        assert error is not None
        assert error.code == code
        assert error.message.startswith("invalid submit message")


@pytest.mark.parametrize("args", [(), ("bad id!",), ("j1", 2)])
def test_malformed_cancel_messages_are_dropped_and_fail_nothing(
    w: World, args: tuple[Any, ...]
) -> None:
    before = seed(w, "j1", S.QUEUED)

    assert TASKS[TASK_CANCEL](w.ctx, "task-id", args, {}) == StepResult(Outcome.MALFORMED)
    assert w.store.jobs == {"j1": before}
    assert w.upstream.calls == {}


# ------------------------------------------------------------------------------ archive
IMAGE_0 = "https://cdn.example.com/out/0.png"
IMAGE_1 = "https://cdn.example.com/out/1.png"
VIDEO_0 = "https://cdn.example.com/out/0.mp4"
COMPLETED = ResultResponse(
    status="completed", output=ResultOutput(image=IMAGE_0, images=[IMAGE_1], video=VIDEO_0)
)


@pytest.mark.parametrize("webhook", [False, True], ids=["no_webhook", "webhook"])
def test_archive_copies_every_output_and_succeeds(w: World, webhook: bool) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5, webhook=webhook, attempt=2, since=w.clock.now - 30)
    w.upstream.on_result.set(COMPLETED)

    result = archive(w.ctx, StepMessage(job_id="j1", seq=5))

    assert result == StepResult(Outcome.SUCCEEDED, "j1")
    assert w.upstream.requests == [("result", RID)]
    assert w.archiver.calls == [
        ("j1", RID, 0, OutputKind.IMAGE, IMAGE_0),
        ("j1", RID, 1, OutputKind.IMAGE, IMAGE_1),
        ("j1", RID, 2, OutputKind.VIDEO, VIDEO_0),
    ]
    job = w.job()
    assert job.status == S.SUCCEEDED
    assert job.record.error is None
    assert job.record.outputs == [
        archived_output("j1", 0, OutputKind.IMAGE, IMAGE_0),
        archived_output("j1", 1, OutputKind.IMAGE, IMAGE_1),
        archived_output("j1", 2, OutputKind.VIDEO, VIDEO_0),
    ]
    assert (job.seq, job.attempt, job.since) == (6, 0, 0.0)
    assert job.record.finished_at is not None
    assert w.store.ttls == {"j1": TTL_S}
    if webhook:
        assert job.outbox == Outbox(TASK_NOTIFY, 6, due_at=w.clock.now)
        assert w.rec.sent == [(TASK_NOTIFY, ["j1", 6], {}, 0.0)]
    else:
        assert job.outbox is None
        assert w.rec.sent == []


def test_only_the_first_archive_run_of_a_job_skips_looking_for_copies(w: World) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5)
    w.upstream.on_result.set(COMPLETED)
    w.archiver.fail(StorageError("S3 503"))  # the first output of the first run

    assert archive(w.ctx, StepMessage(job_id="j1", seq=5)).outcome == Outcome.RETRY
    assert w.archiver.fresh == [True]
    # The retry (and any redelivery or duplicate) may find what an earlier run stored.
    assert archive(w.ctx, StepMessage(job_id="j1", seq=6)).outcome == Outcome.SUCCEEDED
    assert w.archiver.fresh == [True, False, False, False]
    assert w.store.runs["j1", TASK_ARCHIVE] == 2
    # A stale duplicate is counted too (it read the job), and does nothing else.
    assert archive(w.ctx, StepMessage(job_id="j1", seq=6)).outcome == Outcome.STALE
    assert w.store.runs["j1", TASK_ARCHIVE] == 3
    assert len(w.archiver.fresh) == 4


@pytest.mark.parametrize(
    ("result", "archive_failure", "code", "message"),
    [
        (
            ResultResponse(status="failed", error={"message": "nsfw filter"}),
            None,
            ErrorCode.GENERATION_FAILED,
            "upstream generation failed: nsfw filter",
        ),
        (
            ResultResponse(status="completed", output=ResultOutput()),
            None,
            ErrorCode.NO_OUTPUTS,
            "upstream returned no outputs",
        ),
        (
            PermanentUpstreamError("no such request", status_code=404),
            None,
            ErrorCode.UPSTREAM_REJECTED,
            "result refused (404): no such request",
        ),
        (
            COMPLETED,
            TargetForbiddenError("cdn resolves to 169.254.169.254"),
            ErrorCode.OUTPUT_FORBIDDEN,
            "cdn resolves to 169.254.169.254",
        ),
        (
            COMPLETED,
            OutputTooLargeError("image is 60 MB, limit 50 MB"),
            ErrorCode.OUTPUT_TOO_LARGE,
            "image is 60 MB, limit 50 MB",
        ),
    ],
)
def test_archive_fails_at_once_when_retrying_cannot_help(
    w: World,
    result: ResultResponse | ServiceError,
    archive_failure: ServiceError | None,
    code: ErrorCode,
    message: str,
) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5)
    w.upstream.on_result.set(result)
    if archive_failure is not None:
        w.archiver.fail(archive_failure)

    outcome = archive(w.ctx, StepMessage(job_id="j1", seq=5))

    assert outcome == StepResult(Outcome.FAILED, "j1")
    job = w.job()
    assert job.status == S.FAILED
    assert job.record.error == JobError(code=code, message=message)
    assert job.record.outputs == []
    assert (job.seq, job.outbox) == (6, None)
    assert w.archiver.calls[:1] == (
        [("j1", RID, 0, OutputKind.IMAGE, IMAGE_0)] if archive_failure else []
    )
    assert w.rec.sent == []


def test_archive_storage_errors_retry_keeping_when_they_began(w: World) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5)
    w.upstream.on_result.set(COMPLETED)
    w.archiver.fail(StorageError("S3 503"), StorageError("S3 503"))
    first_failure = w.clock.now

    jitter = next_jitter(w.ctx.rng)
    assert archive(w.ctx, StepMessage(job_id="j1", seq=5)) == StepResult(Outcome.RETRY, "j1")
    job = w.job()
    assert (job.status, job.attempt, job.since, job.seq) == (S.ARCHIVING, 1, first_failure, 6)
    delay = backoff(1, jitter, cap=120.0)
    assert job.outbox == Outbox(TASK_ARCHIVE, 6, due_at=w.clock.now + delay)
    assert w.rec.sent == [(TASK_ARCHIVE, ["j1", 6], {}, delay)]

    w.clock.advance(100)
    jitter = next_jitter(w.ctx.rng)
    assert archive(w.ctx, StepMessage(job_id="j1", seq=6)) == StepResult(Outcome.RETRY, "j1")
    job = w.job()
    assert (job.attempt, job.since, job.seq) == (2, first_failure, 7)  # since is kept
    assert w.rec.sent[-1] == (TASK_ARCHIVE, ["j1", 7], {}, backoff(2, jitter, cap=120.0))

    w.clock.advance(5)
    assert archive(w.ctx, StepMessage(job_id="j1", seq=7)) == StepResult(Outcome.SUCCEEDED, "j1")
    job = w.job()
    assert (job.status, job.attempt, job.since) == (S.SUCCEEDED, 0, 0.0)
    assert len(job.record.outputs) == 3
    assert w.upstream.calls == {"result": 3}


@pytest.mark.parametrize(("failing_for_s", "outcome"), [(899.0, Outcome.RETRY), (900.0, None)])
def test_archive_storage_errors_fail_the_job_after_the_window(
    w: World, failing_for_s: float, outcome: Outcome | None
) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5, attempt=6, since=w.clock.now - failing_for_s)
    w.upstream.on_result.set(COMPLETED)
    w.archiver.fail(StorageError("S3 503"))

    result = archive(w.ctx, StepMessage(job_id="j1", seq=5))

    job = w.job()
    if outcome is Outcome.RETRY:
        assert result.outcome == Outcome.RETRY
        assert (job.status, job.attempt) == (S.ARCHIVING, 7)
    else:
        assert result.outcome == Outcome.FAILED
        assert job.status == S.FAILED
        assert job.record.error is not None
        assert job.record.error.code == ErrorCode.STORAGE_ERROR


def test_archive_output_404_fails_output_unavailable_on_the_third_try(w: World) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5)
    w.upstream.on_result.set(COMPLETED)
    gone = DownloadError("GET output: HTTP 404", retryable=False, status_code=404)
    w.archiver.fail(gone, gone, gone)

    outcomes = []
    for seq in (5, 6, 7):
        jitter = next_jitter(w.ctx.rng)
        outcomes.append(archive(w.ctx, StepMessage(job_id="j1", seq=seq)).outcome)
        if outcomes[-1] == Outcome.RETRY:
            assert w.rec.sent[-1] == (TASK_ARCHIVE, ["j1", seq + 1], {}, backoff(seq - 4, jitter))
        w.clock.advance(10)

    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]  # MAX_UNAVAILABLE_TRIES
    job = w.job()
    assert job.status == S.FAILED
    assert job.record.error == JobError(
        code=ErrorCode.OUTPUT_UNAVAILABLE,
        message="output could not be fetched: GET output: HTTP 404",
    )
    assert len(w.archiver.calls) == 3
    assert len(w.rec.sent) == 2


@pytest.mark.parametrize(
    ("result", "seeded_attempt", "outcome", "code"),
    [
        (ResultResponse(status="in_progress"), 0, Outcome.RETRY, None),
        (ResultResponse(status="completed"), 8, Outcome.RETRY, None),
        (ResultResponse(status="completed"), 9, Outcome.FAILED, ErrorCode.UPSTREAM_UNAVAILABLE),
        (UpstreamProtocolError("result is not JSON"), 0, Outcome.RETRY, None),
        (
            UpstreamProtocolError("result is not JSON"),
            9,
            Outcome.FAILED,
            ErrorCode.UPSTREAM_PROTOCOL_ERROR,
        ),
    ],
)
def test_archive_result_not_ready_retries_up_to_ten_attempts(
    w: World,
    result: ResultResponse | ServiceError,
    seeded_attempt: int,
    outcome: Outcome,
    code: ErrorCode | None,
) -> None:
    seed(w, "j1", S.ARCHIVING, seq=5, attempt=seeded_attempt)
    w.upstream.on_result.set(result)

    assert archive(w.ctx, StepMessage(job_id="j1", seq=5)) == StepResult(outcome, "j1")
    job = w.job()
    assert w.archiver.calls == []
    if code is None:
        assert (job.status, job.attempt) == (S.ARCHIVING, seeded_attempt + 1)
        assert [(t, a) for t, a, _, _ in w.rec.sent] == [(TASK_ARCHIVE, ["j1", 6])]
    else:
        assert job.status == S.FAILED
        assert job.record.error is not None
        assert job.record.error.code == code
        assert w.rec.sent == []


def test_stale_archive_does_nothing(w: World) -> None:
    before = seed(w, "j1", S.ARCHIVING, seq=5)

    assert archive(w.ctx, StepMessage(job_id="j1", seq=3)) == StepResult(Outcome.STALE, "j1")
    assert w.upstream.calls == {}
    assert w.archiver.calls == []
    assert w.store.jobs["j1"] == before


# ------------------------------------------------------------------------------ notify
def delivery(outcome: Any, status_code: int | None, error: str | None = None) -> DeliveryResult:
    return DeliveryResult(outcome, status_code, error, 12)


@pytest.mark.parametrize(
    ("answer", "state", "outcome", "error"),
    [
        (delivery("delivered", 204), WebhookState.DELIVERED, Outcome.WEBHOOK_DELIVERED, None),
        (
            delivery("gone", 410, "HTTP 410: gone"),
            WebhookState.FAILED,
            Outcome.WEBHOOK_FAILED,
            "HTTP 410: gone",
        ),
        (
            delivery("permanent", 400, "HTTP 400: bad"),
            WebhookState.FAILED,
            Outcome.WEBHOOK_FAILED,
            "HTTP 400: bad",
        ),
        (
            delivery("forbidden", None, "hooks.example.com resolves to 10.0.0.7"),
            WebhookState.FAILED,
            Outcome.WEBHOOK_FAILED,
            "webhook_target_forbidden: hooks.example.com resolves to 10.0.0.7",
        ),
    ],
)
def test_notify_delivers_once_and_records_the_attempt(
    w: World, answer: DeliveryResult, state: WebhookState, outcome: Outcome, error: str | None
) -> None:
    seeded = seed(w, "j1", S.SUCCEEDED, seq=6, webhook=True)
    w.webhooks.on_deliver.set(answer)

    result = notify(w.ctx, StepMessage(job_id="j1", seq=6))

    assert result == StepResult(outcome, "j1")
    assert w.webhooks.sent == [(HOOK_URL, "msg_j1", event_body(seeded), int(w.clock.now))]
    job = w.job()
    info = job.record.webhook
    assert info is not None
    assert (info.id, info.state) == ("msg_j1", state)
    assert [(d.attempt, d.status_code, d.error, d.duration_ms) for d in info.deliveries] == [
        (1, answer.status_code, error, 12)
    ]
    assert (job.status, job.seq, job.outbox) == (S.SUCCEEDED, 7, None)
    assert w.rec.sent == []


def test_notify_body_is_the_final_record_without_its_delivery_log(w: World) -> None:
    seeded = seed(w, "j1", S.FAILED, seq=2, webhook=True)
    w.webhooks.on_deliver.set(delivery("delivered", 200))

    notify(w.ctx, StepMessage(job_id="j1", seq=2))

    [(_, _, body, _)] = w.webhooks.sent
    event = WebhookEvent.model_validate_json(body)
    assert event.type == "job.failed"
    assert event.data.id == "j1"
    assert event.data.webhook is None
    assert event.data.error == JobError(code=ErrorCode.GENERATION_FAILED, message="seeded")
    assert event.timestamp == seeded.record.finished_at


def test_notify_retries_on_the_schedule_with_the_same_id_and_body(w: World) -> None:
    seed(w, "j1", S.SUCCEEDED, seq=6, webhook=True)
    w.webhooks.on_deliver.set(
        delivery("retry", 503, "HTTP 503"),
        delivery("retry", None, "timeout"),
        delivery("delivered", 200),
    )
    start = w.clock.now

    assert notify(w.ctx, StepMessage(job_id="j1", seq=6)) == StepResult(Outcome.RETRY, "j1")
    # WEBHOOK_RETRY_SCHEDULE[0]
    assert w.rec.sent == [(TASK_NOTIFY, ["j1", 7], {}, 5.0)]
    job = w.job()
    assert job.record.webhook is not None
    assert job.record.webhook.state == WebhookState.PENDING
    assert len(job.record.webhook.deliveries) == 1
    assert job.outbox == Outbox(TASK_NOTIFY, 7, due_at=start + 5.0)

    w.clock.advance(5.0)
    assert notify(w.ctx, StepMessage(job_id="j1", seq=7)) == StepResult(Outcome.RETRY, "j1")
    # WEBHOOK_RETRY_SCHEDULE[1] = 300 s: a long wait, parked in the due index (no message)
    assert len(w.rec.sent) == 1
    assert w.store.due_at["j1"] == start + 305.0
    assert w.job().outbox == Outbox(TASK_NOTIFY, 8, due_at=start + 305.0)

    w.clock.advance(300.0)  # the reconciler sends the promised message when due
    third = notify(w.ctx, StepMessage(job_id="j1", seq=8))
    assert third == StepResult(Outcome.WEBHOOK_DELIVERED, "j1")

    assert [(url, msg_id, ts) for url, msg_id, _, ts in w.webhooks.sent] == [
        (HOOK_URL, "msg_j1", int(start)),
        (HOOK_URL, "msg_j1", int(start + 5)),
        (HOOK_URL, "msg_j1", int(start + 305)),
    ]
    bodies = {body for _, _, body, _ in w.webhooks.sent}
    assert len(bodies) == 1  # byte-identical, though the record changed in between
    info = w.job().record.webhook
    assert info is not None
    assert info.state == WebhookState.DELIVERED
    assert [(d.attempt, d.status_code, d.error) for d in info.deliveries] == [
        (1, 503, "HTTP 503"),
        (2, None, "timeout"),
        (3, 200, None),
    ]
    assert (w.job().seq, w.job().outbox) == (9, None)


def test_notify_gives_up_when_the_schedule_is_exhausted() -> None:
    w = make_world(webhook={"retry_schedule": (5.0, 60.0)})
    seed(w, "j1", S.CANCELLED, seq=2, webhook=True)
    w.webhooks.on_deliver.set(delivery("retry", 500, "HTTP 500"))

    outcomes = []
    for seq in (2, 3, 4):
        outcomes.append(notify(w.ctx, StepMessage(job_id="j1", seq=seq)).outcome)
        w.clock.advance(60)

    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.WEBHOOK_FAILED]
    assert [(t, a, c) for t, a, _, c in w.rec.sent] == [
        (TASK_NOTIFY, ["j1", 3], 5.0),
        (TASK_NOTIFY, ["j1", 4], 60.0),
    ]
    job = w.job()
    assert job.record.webhook is not None
    assert job.record.webhook.state == WebhookState.FAILED
    assert [d.attempt for d in job.record.webhook.deliveries] == [1, 2, 3]
    assert (job.status, job.seq, job.outbox) == (S.CANCELLED, 5, None)
    assert len(w.webhooks.sent) == 3


@pytest.mark.parametrize(
    ("status", "webhook", "delivered_already"),
    [
        (S.SUCCEEDED, False, False),  # no webhook_url
        (S.IN_PROGRESS, True, False),  # not final yet
        (S.SUCCEEDED, True, True),  # already delivered
    ],
)
def test_notify_with_nothing_to_send_sends_nothing(
    w: World, status: JobStatus, webhook: bool, delivered_already: bool
) -> None:
    job = seed(w, "j1", status, seq=4, webhook=webhook)
    if delivered_already:
        assert job.record.webhook is not None
        done = job.record.webhook.model_copy(update={"state": WebhookState.DELIVERED})
        job = w.store.update(job, JobChange(webhook=done)) or job

    result = notify(w.ctx, StepMessage(job_id="j1", seq=4))

    assert result == StepResult(Outcome.NOTHING_TO_SEND, "j1")
    assert w.webhooks.sent == []
    assert w.rec.sent == []
    assert w.store.jobs["j1"] == job


def test_stale_notify_sends_nothing(w: World) -> None:
    before = seed(w, "j1", S.SUCCEEDED, seq=6, webhook=True)

    assert notify(w.ctx, StepMessage(job_id="j1", seq=9)) == StepResult(Outcome.STALE, "j1")
    assert w.webhooks.sent == []
    assert w.store.jobs["j1"] == before


# ------------------------------------------------------------------------------ cancel
@pytest.mark.parametrize("webhook", [False, True], ids=["no_webhook", "webhook"])
def test_cancel_of_a_queued_job_is_local(w: World, webhook: bool) -> None:
    seed(w, "j1", S.QUEUED, webhook=webhook)

    result = cancel(w.ctx, CancelMessage(job_id="j1"))

    assert result == StepResult(Outcome.CANCELLED, "j1")
    assert w.upstream.calls == {}
    job = w.job()
    assert job.status == S.CANCELLED
    assert job.record.error == JobError(
        code=ErrorCode.CANCELLED, message="cancelled before submission"
    )
    assert job.seq == 1
    assert w.rec.sent == ([(TASK_NOTIFY, ["j1", 1], {}, 0.0)] if webhook else [])
    # its submit message, still in the queue, is stale and never reaches upstream
    w.rec.sent.clear()
    request = HOOKED if webhook else REQUEST
    late = submit(w.ctx, SubmitMessage(job_id="j1", request=request), owner="t1")
    assert late == StepResult(Outcome.STALE, "j1")
    assert w.upstream.calls == {}
    assert all(task != TASK_POLL for task, *_ in w.rec.sent)
    assert w.job() == job


def test_cancel_of_a_job_in_upstreams_queue_cancels_it_there_first(w: World) -> None:
    seed(w, "j1", S.IN_QUEUE, seq=1, queue_position=4)
    w.upstream.on_cancel.set(CancelResponse(status="cancelled", request_id=RID))

    result = cancel(w.ctx, CancelMessage(job_id="j1"))

    assert result == StepResult(Outcome.CANCELLED, "j1")
    assert w.upstream.requests == [("cancel", RID)]
    job = w.job()
    assert job.status == S.CANCELLED
    assert job.record.error == JobError(
        code=ErrorCode.CANCELLED, message="cancelled by the producer"
    )
    assert (job.record.queue_position, job.seq, job.outbox) == (None, 2, None)
    assert w.rec.sent == []
    # the poll already in flight is now stale
    assert poll(w.ctx, StepMessage(job_id="j1", seq=1)).outcome == Outcome.STALE
    assert w.upstream.calls == {"cancel": 1}


@pytest.mark.parametrize(
    ("status", "cancel_answer", "status_answer", "after", "calls"),
    [
        # upstream started it meanwhile: the record learns at once (status only)
        (
            S.IN_QUEUE,
            NotCancellableError("request is running"),
            IN_PROGRESS_ANSWER,
            S.IN_PROGRESS,
            {"cancel": 1, "status": 1},
        ),
        (
            S.IN_QUEUE,
            NotCancellableError("request is running"),
            IN_QUEUE_ANSWER,
            S.IN_QUEUE,
            {"cancel": 1, "status": 1},
        ),
        (
            S.IN_QUEUE,
            NotCancellableError("request is running"),
            RetryableUpstreamError("timeout"),
            S.IN_QUEUE,
            {"cancel": 1, "status": 1},
        ),
        # running or past it: refused without asking upstream
        (S.IN_PROGRESS, None, None, S.IN_PROGRESS, {}),
        (S.ARCHIVING, None, None, S.ARCHIVING, {}),
        (S.SUBMITTING, None, None, S.SUBMITTING, {}),
    ],
)
def test_cancel_of_running_work_is_refused(
    w: World,
    status: JobStatus,
    cancel_answer: ServiceError | None,
    status_answer: StatusResponse | ServiceError | None,
    after: JobStatus,
    calls: dict[str, int],
) -> None:
    before = seed(w, "j1", status, seq=2, queue_position=2 if status == S.IN_QUEUE else None)
    if cancel_answer is not None:
        w.upstream.on_cancel.set(cancel_answer)
    if status_answer is not None:
        w.upstream.on_status.set(status_answer)

    result = cancel(w.ctx, CancelMessage(job_id="j1"))

    assert result == StepResult(Outcome.NOT_CANCELLABLE, "j1")
    assert w.upstream.calls == calls
    job = w.job()
    assert job.status == after
    # the poll chain carries on untouched
    assert (job.seq, job.outbox) == (before.seq, before.outbox)
    if after == status:
        assert job == before
    else:
        assert job.record.queue_position is None
    assert w.rec.sent == []


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (S.SUCCEEDED, Outcome.ALREADY_FINAL),
        (S.FAILED, Outcome.ALREADY_FINAL),
        (S.CANCELLED, Outcome.CANCELLED),  # cancelled already: the same answer again
    ],
)
def test_cancel_of_a_final_job_changes_nothing(
    w: World, status: JobStatus, outcome: Outcome
) -> None:
    before = seed(w, "j1", status, seq=4, webhook=True)

    assert cancel(w.ctx, CancelMessage(job_id="j1")) == StepResult(outcome, "j1")
    assert w.store.jobs["j1"] == before
    assert w.upstream.calls == {}
    assert w.rec.sent == []


def test_cancel_that_upstream_fails_to_answer_leaves_the_job(w: World) -> None:
    before = seed(w, "j1", S.IN_QUEUE, seq=1)
    w.upstream.on_cancel.set(RetryableUpstreamError("503", status_code=503))

    assert cancel(w.ctx, CancelMessage(job_id="j1")) == StepResult(Outcome.CANCEL_FAILED, "j1")
    assert w.store.jobs["j1"] == before
    assert w.rec.sent == []


def test_cancel_of_an_unknown_job_fails_quietly(w: World) -> None:
    assert cancel(w.ctx, CancelMessage(job_id="nope")) == StepResult(Outcome.CANCEL_FAILED, "nope")
    assert w.store.jobs == {}


def test_cancel_queued_returns_none_for_a_job_being_submitted(w: World) -> None:
    before = seed(w, "j1", S.SUBMITTING, seq=0, lease=Lease("t1", w.clock.now + 50))

    assert cancel_queued(w.ctx.handoff, "j1") is None
    assert w.store.jobs["j1"] == before


def test_cancel_queued_cancels_a_queued_job_and_returns_a_final_one_as_is(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    final = seed(w, "j2", S.SUCCEEDED)

    done = cancel_queued(w.ctx.handoff, "j1")
    assert done is not None
    assert done == w.job("j1")
    assert done.status == S.CANCELLED
    assert cancel_queued(w.ctx.handoff, "j2") == final


# ------------------------------------------------------------------------------ JobChange
@pytest.mark.parametrize("name", ["stauts", "request_idd", "output", "webhook_url"])
def test_job_change_refuses_a_misspelt_field(name: str) -> None:
    misspelt: dict[str, Any] = {name: "x"}
    with pytest.raises(TypeError, match=name):
        JobChange(**misspelt)
    with pytest.raises(TypeError, match=name):
        JobChange(status=S.FAILED).but(**misspelt)
    # spelt right, the same calls work
    assert JobChange(status=S.FAILED).but(request_id="x").request_id == "x"


@pytest.mark.parametrize(
    ("status", "new"),
    [
        (S.QUEUED, S.IN_QUEUE),
        (S.SUBMITTING, S.QUEUED),
        (S.IN_PROGRESS, S.IN_QUEUE),
        (S.ARCHIVING, S.CANCELLED),
        (S.SUCCEEDED, S.FAILED),
        (S.CANCELLED, S.SUBMITTING),
        (S.FAILED, S.SUCCEEDED),
    ],
)
def test_refused_transition_leaves_the_memory_store_unchanged(
    w: World, status: JobStatus, new: JobStatus
) -> None:
    before = seed(w, "j1", status, seq=2)
    events, ttls = list(w.store.events), dict(w.store.ttls)

    with pytest.raises(TransitionRefusedError):
        w.store.update(before, JobChange(status=new, seq=3, notes=["never written"]))

    assert w.store.jobs == {"j1": before}
    assert w.store.events == events
    assert w.store.ttls == ttls


def test_a_write_from_a_stale_read_is_refused_and_changes_nothing(w: World) -> None:
    stale = seed(w, "j1", S.IN_QUEUE, seq=1)
    current = w.store.update(stale, JobChange(status_calls=1))
    assert current is not None

    assert w.store.update(stale, JobChange(status=S.FAILED)) is None
    assert w.store.jobs["j1"] is current
    assert current.version == stale.version + 1


# ------------------------------------------------------------------------------ long submit waits
def test_a_long_submit_retry_is_parked_then_submits_when_due(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    start = w.clock.now
    w.upstream.on_submit.set(
        RetryableUpstreamError("429", status_code=429, retry_after_s=250.0),
        SubmitResponse(request_id=RID),
    )
    assert submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1").outcome == (
        Outcome.RETRY
    )
    # 250 s is a long wait: no message held by a worker, the promise is in the due index
    assert w.rec.sent == []
    assert w.job().outbox == Outbox(TASK_SUBMIT, 1, due_at=start + 250.0)
    assert w.store.due_at["j1"] == start + 250.0
    assert w.store.due(start + 249.0, 10) == []

    w.clock.now = start + 250.0  # what the reconciler sends once due
    args, kwargs = ("j1", PAYLOAD), {"seq": 1}
    assert TASKS[TASK_SUBMIT](w.ctx, "t2", args, kwargs) == StepResult(Outcome.SUBMITTED, "j1")
    assert w.upstream.calls["submit"] == 2
    assert (w.job().status, w.job().seq) == (S.IN_QUEUE, 2)


def test_a_hop_from_an_older_release_is_sent_on_until_due(w: World) -> None:
    seed(w, "j1", S.QUEUED)
    start = w.clock.now
    kwargs = {"seq": 0, "not_before": start + 250.0}
    result = TASKS[TASK_SUBMIT](w.ctx, "t1", ("j1", PAYLOAD), kwargs)
    assert result == StepResult(Outcome.DEFERRED, "j1")
    assert w.rec.sent == [(TASK_SUBMIT, ["j1", PAYLOAD], kwargs, 100.0)]
    assert w.upstream.calls == {}


# ------------------------------------------------------------------------------ races
def test_a_poll_that_loses_its_compare_and_set_runs_again_and_carries_on(w: World) -> None:
    from worker.queueing.tasks import run_body

    seed(w, "j1", S.IN_QUEUE, seq=3)
    w.upstream.on_status.set(StatusResponse(status="in_queue", queue_position=2))
    real_update = w.store.update
    raced: list[bool] = []

    def racing_update(job: StoredJob, change: JobChange, **kw: Any) -> StoredJob | None:
        if not raced and change.seq == job.seq + 1:
            # a refused cancel's status refresh lands between this poll's read and its write
            raced.append(True)
            assert real_update(w.store.load(job.id), JobChange(queue_position=5)) is not None
        return real_update(job, change, **kw)

    w.store.update = racing_update  # type: ignore[method-assign]
    result = run_body(w.ctx, TASK_POLL, "t1", ("j1", 3), {})

    assert raced == [True]
    assert result == StepResult(Outcome.RESCHEDULED, "j1")  # the second run went through
    assert w.upstream.calls["status"] == 2
    assert w.job().seq == 4
    assert [(t, a) for t, a, _, _ in w.rec.sent] == [(TASK_POLL, ["j1", 4])]


def test_a_submit_whose_answer_meets_a_concurrent_write_records_it_without_posting_twice(
    w: World,
) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))
    real_update = w.store.update
    raced: list[bool] = []

    def racing_update(job: StoredJob, change: JobChange, **kw: Any) -> StoredJob | None:
        if not raced and change.request_id == RID:
            raced.append(True)  # another write (notes, a status refresh) after our claim
            assert real_update(w.store.load(job.id), JobChange(notes=["x"])) is not None
        return real_update(job, change, **kw)

    w.store.update = racing_update  # type: ignore[method-assign]
    result = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")

    assert result == StepResult(Outcome.SUBMITTED, "j1")
    assert w.upstream.calls["submit"] == 1
    assert (w.job().status, w.job().record.request_id, w.job().seq) == (S.IN_QUEUE, RID, 1)


def test_a_post_whose_answer_could_not_be_written_is_recorded_not_posted_again(
    w: World,
) -> None:
    seed(w, "j1", S.QUEUED)
    w.upstream.on_submit.set(SubmitResponse(request_id=RID))
    real_update = w.store.update
    broken = [True]

    def redis_gone_once(job: StoredJob, change: JobChange, **kw: Any) -> StoredJob | None:
        if broken and change.request_id == RID:
            broken.clear()
            raise ConnectionError("Redis went away")  # after the POST, before its write
        return real_update(job, change, **kw)

    w.store.update = redis_gone_once  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")
    assert w.ctx.unrecorded == {"j1": RID}
    # Celery retries the same delivery (same task id, so the lease is its own)
    again = submit(w.ctx, SubmitMessage(job_id="j1", request=REQUEST), owner="t1")
    assert again == StepResult(Outcome.SUBMITTED, "j1")
    assert w.upstream.calls["submit"] == 1  # not paid twice
    job = w.job()
    assert (job.status, job.record.request_id) == (S.IN_QUEUE, RID)
    assert not any(n.startswith("ambiguous_submit") for n in job.record.notes)
    assert w.ctx.unrecorded == {}
