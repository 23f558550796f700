"""Job steps against real Redis and the emulator over HTTP, with a recording publisher
and an injected clock: the at-least-once corners that a live worker rarely hits on cue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api_contracts.jobs import JobRequest, JobStatus
from api_contracts.messages import TASK_POLL, TASK_SUBMIT
from worker.constants import DUE_KEY
from worker.devtools.embedded import EmbeddedRedis
from worker.devtools.emulator import EmulatorConfig, EmulatorServer
from worker.jobs.handoff import OUTBOX_GRACE_S, Handoff, StepResult
from worker.jobs.state import JobChange, Lease, Outbox
from worker.jobs.steps import StepContext
from worker.queueing.tasks import TASKS
from worker.runtime import Runtime
from worker.settings import (
    BrokerSettings,
    JobSettings,
    PollSettings,
    RedisSettings,
    RunComfySettings,
    Settings,
)

pytestmark = pytest.mark.integration

TOKEN = "steps-token"


class Recorder:
    """A Publisher that records messages (and can fail once, like a worker dying)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any], float]] = []
        self.fail_next = False

    def __call__(
        self, task: str, args: list[Any], kwargs: dict[str, Any], countdown: float
    ) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("worker died before publishing")
        self.sent.append((task, args, kwargs, countdown))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(token=TOKEN, queue_s=5, run_s=5), port=0) as emu:
        yield emu


@pytest.fixture
def runtime(redis_server: EmbeddedRedis, emulator: EmulatorServer) -> Iterator[Runtime]:
    settings = Settings(
        redis=RedisSettings(url=redis_server.url),
        runcomfy=RunComfySettings(base_url=emulator.base_url, api_token=TOKEN),
        poll=PollSettings(initial_delay_s=1, min_interval_s=1, max_interval_s=30),
        job=JobSettings(deadline_s=1800, ttl_s=600),
        broker=BrokerSettings(visibility_timeout_s=400),
    )
    rt = Runtime(settings)
    rt.redis.flushdb()
    yield rt
    rt.close()


class Steps:
    """Runs task bodies exactly as the Celery tasks do, on a recording publisher."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, owner: str) -> StepResult:
        return TASKS[TASK_SUBMIT](self.ctx, owner, args, kwargs)

    def poll(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepResult:
        return TASKS[TASK_POLL](self.ctx, "task-id", args, kwargs)


def make(rt: Runtime, clock: Clock | None = None) -> tuple[Steps, Recorder]:
    import time

    rec = Recorder()
    clock = clock or Clock(time.time())
    handoff = Handoff(rt.store, rec, max_countdown_s=rt.settings.max_countdown_s, clock=clock)
    ctx = StepContext(
        settings=rt.settings,
        store=rt.store,
        handoff=handoff,
        services=rt,
        clock=clock,
    )
    return Steps(ctx), rec


REQ = {"input": {"prompt": "steps", "force_single": True}}


def test_submit_posts_once_and_duplicates_never_post_again(
    runtime: Runtime, emulator: EmulatorServer
) -> None:
    pipe, rec = make(runtime)
    before = emulator.counters()["submits"]
    assert pipe.submit(("j1", REQ), {}, owner="t1").outcome == "submitted"
    assert [(m[0], m[1]) for m in rec.sent] == [(TASK_POLL, ["j1", 1])]
    assert rec.sent[0][3] == 1.0  # POLL_INITIAL_DELAY_S
    job = runtime.store.load("j1")
    assert job.status == JobStatus.IN_QUEUE and job.record.request_id
    # the same message again (redelivered or duplicated): no POST, nothing sent; the due
    # index (Redis TIME) holds the promised poll, overdue 1 s + grace from now
    assert pipe.submit(("j1", REQ), {}, owner="t2").outcome == "stale"
    assert emulator.counters()["submits"] - before == 1
    assert len(rec.sent) == 1
    due = runtime.redis.zscore(DUE_KEY, "j1")
    now = runtime.store.now()
    assert due is not None and now < due <= now + 1.0 + OUTBOX_GRACE_S


def test_lost_publish_is_recovered_by_the_redelivered_message(runtime: Runtime) -> None:
    pipe, rec = make(runtime)
    rec.fail_next = True
    with pytest.raises(ConnectionError):
        pipe.submit(("j2", REQ), {}, owner="t1")  # wrote in_queue + outbox, then "died"
    assert rec.sent == []
    job = runtime.store.load("j2")
    assert job.seq == 1 and job.outbox is not None and job.outbox.task == TASK_POLL
    # acks_late redelivers the submit much later (by Redis TIME): the poll is overdue
    late = Outbox(TASK_POLL, 1, due_at=job.read_at - OUTBOX_GRACE_S - 5)
    assert runtime.store.update(job, JobChange(outbox=late)) is not None
    assert pipe.submit(("j2", REQ), {}, owner="t1").outcome == "stale"
    assert [(m[0], m[1]) for m in rec.sent] == [(TASK_POLL, ["j2", 1])]


def test_ambiguous_submit_is_counted_noted_and_submitted(
    runtime: Runtime, emulator: EmulatorServer
) -> None:
    pipe, _ = make(runtime)
    job, _ = runtime.store.create_if_absent("j3", JobRequest.model_validate(REQ))
    runtime.store.update(job, JobChange(status=JobStatus.SUBMITTING, lease=Lease("t-dead", 1.0)))
    before = emulator.counters()["submits"]
    assert pipe.submit(("j3", REQ), {}, owner="t-dead").outcome == "submitted"
    record = runtime.store.load("j3").record
    assert any(n.startswith("ambiguous_submit") for n in record.notes)
    assert runtime.store.stats()["ambiguous_submits"] == 1
    assert emulator.counters()["submits"] - before == 1


def test_concurrent_duplicate_defers_to_the_lease_holder(runtime: Runtime) -> None:
    import time

    pipe, rec = make(runtime)
    job, _ = runtime.store.create_if_absent("j4", JobRequest.model_validate(REQ))
    runtime.store.update(
        job, JobChange(status=JobStatus.SUBMITTING, lease=Lease("t-live", time.time() + 60))
    )
    assert pipe.submit(("j4", REQ), {}, owner="t-other").outcome == "submit_in_progress_elsewhere"
    assert rec.sent == []


def test_stale_poll_does_nothing(runtime: Runtime, emulator: EmulatorServer) -> None:
    pipe, rec = make(runtime)
    pipe.submit(("j5", REQ), {}, owner="t1")
    rid = runtime.store.load("j5").record.request_id or ""
    calls = emulator.counters()["status_calls_by_request"].get(rid, 0)
    rec.sent.clear()
    assert pipe.poll(("j5", 7), {}).outcome == "stale"
    assert rec.sent == []
    assert emulator.counters()["status_calls_by_request"].get(rid, 0) == calls


def test_poll_reschedules_with_next_seq(runtime: Runtime) -> None:
    pipe, rec = make(runtime)
    pipe.submit(("j6", REQ), {}, owner="t1")
    rec.sent.clear()
    assert pipe.poll(("j6", 1), {}).outcome == "rescheduled"
    (task, args, _kwargs, countdown) = rec.sent[0]
    assert (task, args) == (TASK_POLL, ["j6", 2])
    assert 0.9 <= countdown <= 1.1
    record = runtime.store.load("j6").record
    assert record.status_calls == 1 and record.queue_position is not None
    # the same poll message again loses: the chain does not fork
    assert pipe.poll(("j6", 1), {}).outcome == "stale"


def test_long_waits_hop_below_the_visibility_timeout(runtime: Runtime) -> None:
    pipe, rec = make(runtime)
    pipe.submit(("j7", REQ), {}, owner="t1")
    rec.sent.clear()
    import time

    far = time.time() + 5000
    assert pipe.poll(("j7", 1), {"not_before": far}).outcome == "deferred"
    (task, args, kwargs, countdown) = rec.sent[0]
    assert (task, args, kwargs["not_before"]) == (TASK_POLL, ["j7", 1], far)
    assert countdown == runtime.settings.max_countdown_s == 100


@pytest.mark.parametrize(
    "args",
    [(), ("bad id!",), ("j8", "one"), ("j8", 1, 2)],
)
def test_malformed_poll_messages_are_reported_not_raised(
    runtime: Runtime, args: tuple[Any, ...]
) -> None:
    pipe, rec = make(runtime)
    assert pipe.poll(args, {}).outcome == "malformed"
    assert rec.sent == []
