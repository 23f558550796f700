"""The reconciler: its decisions as a table, and passes over the in-memory store with a
recording publisher and a fixed clock."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from api_contracts.jobs import JobRequest, JobStatus, WebhookInfo, WebhookState
from api_contracts.messages import TASK_ARCHIVE, TASK_NOTIFY, TASK_POLL, TASK_SUBMIT
from api_contracts.upstream import CancelResponse
from tests.unit.fakes import Clock, FakeUpstream, Recorder
from worker.jobs.handoff import OUTBOX_GRACE_S, Handoff
from worker.jobs.memory import InMemoryJobStore
from worker.jobs.reconcile import Action, ReconcileLoop, Reconciler, decide
from worker.jobs.state import JobChange, Lease, Outbox, StoredJob

S = JobStatus
NOW = 1_800_000_000.0
DEADLINE = 1800.0
INTERVAL = 15.0
REQ = JobRequest.model_validate({"input": {"prompt": "p"}})
HOOKED = JobRequest.model_validate({"input": {"prompt": "p"}, "webhook_url": "https://e.com/h"})


def job(
    status: JobStatus,
    *,
    age: float = 60.0,
    seq: int = 3,
    outbox: tuple[str, int, float] | None = None,
    lease: tuple[str, float] | None = None,
    webhook: WebhookState | None = None,
) -> StoredJob:
    """A job as read at NOW; ``outbox`` is (task, seq, due in s from NOW)."""
    from api_contracts.jobs import JobRecord

    created = datetime.fromtimestamp(NOW - age, UTC)
    record = JobRecord(
        id="j1",
        status=status,
        created_at=created,
        updated_at=created,
        request=HOOKED if webhook else REQ,
        webhook=WebhookInfo(id="msg_j1", state=webhook) if webhook else None,
    )
    return StoredJob(
        record=record,
        version=5,
        seq=seq,
        outbox=Outbox(outbox[0], outbox[1], NOW + outbox[2]) if outbox else None,
        lease=Lease(lease[0], NOW + lease[1]) if lease else None,
        read_at=NOW,
        created_ts=NOW - age,
    )


RETRY = OUTBOX_GRACE_S + INTERVAL


@pytest.mark.parametrize(
    ("the_job", "action", "task", "look_again"),
    [
        (None, Action.DROP, None, None),
        # a queued job whose submit message never ran
        (job(S.QUEUED, seq=0), Action.RESUBMIT, TASK_SUBMIT, RETRY),
        # a submit mid-POST: wait for its lease; after it, resubmit (the ambiguous window)
        (job(S.SUBMITTING, lease=("t", 20.0)), Action.WAIT, None, 21.0),
        (job(S.SUBMITTING, lease=("t", -1.0)), Action.RESUBMIT, TASK_SUBMIT, RETRY),
        # a parked submit retry or status check that is due (within its grace: only parked
        # waits are in the index then) is woken; a lost one (past the grace) is republished
        (job(S.SUBMITTING, outbox=(TASK_SUBMIT, 3, -5)), Action.WAKE, TASK_SUBMIT, RETRY),
        (job(S.IN_PROGRESS, outbox=(TASK_POLL, 3, -0.2)), Action.WAKE, TASK_POLL, RETRY),
        (job(S.SUBMITTING, outbox=(TASK_SUBMIT, 3, -40)), Action.REPUBLISH, TASK_SUBMIT, 40.0),
        # in the index before its promise is due (an older due time a race left there):
        # nothing is sent, it is looked at again when the promise falls due
        (job(S.IN_PROGRESS, outbox=(TASK_POLL, 3, 870)), Action.WAIT, None, 870.0),
        # a lost poll, archive: looked at again after as long as it is overdue (≥ RETRY)
        (job(S.IN_QUEUE, outbox=(TASK_POLL, 3, -20)), Action.REPUBLISH, TASK_POLL, RETRY),
        (job(S.IN_PROGRESS, outbox=(TASK_POLL, 3, -40)), Action.REPUBLISH, TASK_POLL, 40.0),
        (job(S.ARCHIVING, outbox=(TASK_ARCHIVE, 3, -400)), Action.REPUBLISH, TASK_ARCHIVE, 400.0),
        # an outbox of an older seq: nothing is promised for this seq, hand off afresh
        (job(S.IN_QUEUE, outbox=(TASK_POLL, 2, -40)), Action.REPUBLISH, TASK_POLL, None),
        # past the deadline while generating
        (
            job(S.IN_QUEUE, age=DEADLINE, outbox=(TASK_POLL, 3, -1)),
            Action.FAIL_DEADLINE,
            None,
            None,
        ),
        (job(S.QUEUED, age=DEADLINE + 1, seq=0), Action.FAIL_DEADLINE, None, None),
        # ... but not while a submit holds its lease, nor once upstream has finished
        (job(S.SUBMITTING, age=DEADLINE + 1, lease=("t", 5.0)), Action.WAIT, None, 6.0),
        (
            job(S.ARCHIVING, age=DEADLINE + 1, outbox=(TASK_ARCHIVE, 3, -40)),
            Action.REPUBLISH,
            TASK_ARCHIVE,
            40.0,
        ),
        # final jobs: a webhook owed is resumed, anything else leaves the index
        (job(S.SUCCEEDED), Action.DROP, None, None),
        (job(S.FAILED, webhook=WebhookState.DELIVERED), Action.DROP, None, None),
        (
            job(S.SUCCEEDED, webhook=WebhookState.PENDING, outbox=(TASK_NOTIFY, 3, -400)),
            Action.REPUBLISH,
            TASK_NOTIFY,
            400.0,
        ),
        (
            job(S.CANCELLED, webhook=WebhookState.PENDING),
            Action.RESUME_WEBHOOK,
            TASK_NOTIFY,
            RETRY,
        ),
    ],
)
def test_decide(
    the_job: StoredJob | None, action: Action, task: str | None, look_again: float | None
) -> None:
    plan = decide(
        the_job, now=NOW, deadline_s=DEADLINE, interval_s=INTERVAL, grace_s=OUTBOX_GRACE_S
    )
    assert (plan.action, plan.task) == (action, task)
    if look_again is not None:
        assert plan.look_again_in == pytest.approx(look_again)
    assert plan.reason


# ------------------------------------------------------------------------------ passes
class World:
    def __init__(self) -> None:
        self.clock = Clock(NOW)
        self.store = InMemoryJobStore(deadline_s=DEADLINE, submit_grace_s=300, clock=self.clock)
        self.rec = Recorder()
        self.upstream = FakeUpstream()
        self.handoff = Handoff(self.store, self.rec, max_countdown_s=600, clock=self.clock)
        self.reconciler = Reconciler(
            self.handoff,
            lambda: self.upstream,
            deadline_s=DEADLINE,
            interval_s=INTERVAL,
            batch=100,
        )

    def sent(self) -> list[tuple[str, list[Any]]]:
        return [(task, args) for task, args, _, _ in self.rec.sent]


@pytest.fixture
def w() -> World:
    return World()


def test_a_queued_job_gets_its_submit_again_only_after_the_grace(w: World) -> None:
    w.store.create_if_absent("j1", REQ)
    w.clock.advance(299)
    assert w.reconciler.run_pass() == []
    w.clock.advance(2)
    [done] = w.reconciler.run_pass()
    assert (done.job_id, done.plan.action) == ("j1", Action.RESUBMIT)
    # a fresh hand-off: seq 1 promised, sent with the request
    assert [(t, a[0]) for t, a in w.sent()] == [(TASK_SUBMIT, "j1")]
    assert w.rec.sent[0][2] == {"seq": 1}
    assert w.store.load("j1").seq == 1
    # and it is not resent on the next pass: due again only after grace + interval
    assert w.reconciler.run_pass() == []
    assert w.store.due_at["j1"] == pytest.approx(w.clock.now + RETRY)


def test_a_lost_poll_is_republished_with_the_same_seq(w: World) -> None:
    job, _ = w.store.create_if_absent("j1", REQ)
    for status in (S.SUBMITTING, S.IN_QUEUE):
        job = w.store.update(job, JobChange(status=status)) or job
    w.handoff.publish = lambda *a: None  # the worker "died" before its publish reached Redis
    after = w.handoff.handoff(job, TASK_POLL, countdown=5)
    assert after is not None
    w.handoff.publish = w.rec
    w.clock.advance(5 + OUTBOX_GRACE_S - 1)
    assert w.reconciler.run_pass() == []  # not overdue yet
    w.clock.advance(1)
    [done] = w.reconciler.run_pass()
    assert done.plan.action == Action.REPUBLISH
    assert w.sent() == [(TASK_POLL, ["j1", after.seq])]
    assert w.store.load("j1").version == after.version  # nothing written


def test_deadline_fails_the_job_and_cancels_it_upstream_when_queued_there(w: World) -> None:
    job, _ = w.store.create_if_absent("j1", HOOKED)
    for status in (S.SUBMITTING, S.IN_QUEUE):
        job = w.store.update(job, JobChange(status=status, request_id="rid")) or job
    w.upstream.on_cancel.set(CancelResponse.model_validate({"status": "cancelled"}))
    w.clock.advance(DEADLINE)
    [done] = w.reconciler.run_pass()
    assert done.plan.action == Action.FAIL_DEADLINE
    final = w.store.load("j1")
    assert final.status == S.FAILED and final.record.error is not None
    assert final.record.error.code == "deadline_exceeded"
    assert w.upstream.calls["cancel"] == 1
    assert w.sent() == [(TASK_NOTIFY, ["j1", final.seq])]  # the webhook follows


def test_dry_run_lists_without_acting(w: World) -> None:
    w.store.create_if_absent("j1", REQ)
    w.clock.advance(400)
    [item] = w.reconciler.run_pass(dry_run=True)
    assert item.plan.action == Action.RESUBMIT and item.status == "queued"
    assert item.as_dict()["action"] == "resubmit"
    assert w.rec.sent == []
    assert w.store.load("j1").seq == 0


def test_only_due_jobs_are_read(w: World) -> None:
    for i in range(50):
        w.store.create_if_absent(f"j{i}", REQ)
    w.clock.advance(301)
    w.store.create_if_absent("late", REQ)  # due 300 s from now
    reads: list[str] = []
    real_get = w.store.get

    def counting_get(job_id: str) -> StoredJob | None:
        reads.append(job_id)
        return real_get(job_id)

    w.store.get = counting_get  # type: ignore[method-assign]
    w.reconciler.batch = 20
    assert len(w.reconciler.run_pass()) == 20  # the batch limit
    assert len(set(reads)) == 20 and "late" not in reads


def test_final_jobs_leave_the_due_index(w: World) -> None:
    job, _ = w.store.create_if_absent("j1", REQ)
    assert "j1" in w.store.due_at
    w.store.update(job, JobChange(status=S.CANCELLED))
    assert "j1" not in w.store.due_at


# ------------------------------------------------------------------------------ wake passes
def test_a_parked_status_check_is_woken_when_due_and_not_before(w: World) -> None:
    job, _ = w.store.create_if_absent("j1", REQ)
    for status in (S.SUBMITTING, S.IN_PROGRESS):
        job = w.store.update(job, JobChange(status=status)) or job
    after = w.handoff.handoff(job, TASK_POLL, countdown=300)  # > PARK_AFTER_S: parked
    assert after is not None and w.sent() == []
    w.clock.advance(299.5)
    assert w.reconciler.wake() == []
    w.clock.advance(0.5)
    [done] = w.reconciler.wake()
    assert done.plan.action == Action.WAKE
    assert w.sent() == [(TASK_POLL, ["j1", after.seq])]
    # it must now run: overdue (republished) only after grace + interval
    assert w.store.due_at["j1"] == pytest.approx(w.clock.now + RETRY)


def test_a_woken_check_that_ran_at_once_keeps_its_own_next_due_time(w: World) -> None:
    """The wake pass writes when to look again before it sends: the poll the message runs
    then plans the next check (15 min on), and that plan is what stays in the index."""
    job, _ = w.store.create_if_absent("j1", REQ)
    for status in (S.SUBMITTING, S.IN_PROGRESS):
        job = w.store.update(job, JobChange(status=status)) or job
    assert w.handoff.handoff(job, TASK_POLL, countdown=300) is not None
    w.clock.advance(300)

    class RunsAtOnce(Recorder):
        """A worker that picks the message up before the pass's next line."""

        def __call__(
            self, task: str, args: list[Any], kwargs: dict[str, Any], countdown: float
        ) -> None:
            super().__call__(task, args, kwargs, countdown)
            fresh = w.store.get("j1")
            if fresh is not None and countdown == 0:
                w.handoff.handoff(fresh, TASK_POLL, countdown=900)

    w.handoff.publish = w.rec = RunsAtOnce()
    [done] = w.reconciler.wake()
    assert done.plan.action == Action.WAKE
    assert w.store.due_at["j1"] == pytest.approx(w.clock.now + 900)
    w.clock.advance(RETRY + 1)
    assert w.reconciler.wake() == []  # nothing due: no second check 30 s later


def test_the_loop_wakes_every_wake_period_and_runs_full_passes_per_interval() -> None:
    class FakeReconciler:
        interval_s = 0.4

        def __init__(self) -> None:
            self.passes = self.wakes = 0
            self.full_passes_woke: set[bool] = set()

        def run_pass(self, *, wake: bool = True) -> None:
            self.passes += 1
            self.full_passes_woke.add(wake)

        def wake(self, *, keep_alive: Any = None) -> None:
            self.wakes += 1

    class Lock:
        """A pass lock as Redis keeps it (expiry on a monotonic clock)."""

        def __init__(self) -> None:
            self.until = 0.0
            self.holder: str | None = None
            self.held = 0

        def take(self, owner: str, hold_s: float) -> bool:
            if time.monotonic() < self.until:
                return False
            self.until, self.holder = time.monotonic() + hold_s, owner
            self.held += 1
            return True

        def release(self, owner: str, keep_s: float) -> None:
            assert owner == self.holder
            self.until = time.monotonic() + max(0.0, keep_s)

        def renew(self, owner: str, hold_s: float) -> bool:
            raise AssertionError("short passes need no renewal")

    fake = FakeReconciler()
    loop = ReconcileLoop(
        fake,  # type: ignore[arg-type]
        Lock(),
        wake_s=0.05,
        wake_lock=Lock(),
    )
    loop.start()
    time.sleep(1.0)
    loop.stop()
    assert 1 <= fake.passes <= 4  # once per interval (0.4 s)
    assert fake.wakes >= 5  # wake passes (every 0.05 s) in between
    assert fake.full_passes_woke == {False}  # the due index is the wake passes' alone


class SharedLock:
    """A pass lock as Redis keeps it: an owner and an expiry (monotonic clock)."""

    def __init__(self) -> None:
        self.until = 0.0
        self.owner: str | None = None
        self.lock = threading.Lock()

    def take(self, owner: str, hold_s: float) -> bool:
        with self.lock:
            if time.monotonic() < self.until:
                return False
            self.until, self.owner = time.monotonic() + hold_s, owner
            return True

    def release(self, owner: str, keep_s: float) -> None:
        with self.lock:
            if self.owner == owner:
                self.until = time.monotonic() + max(0.0, keep_s)

    def renew(self, owner: str, hold_s: float) -> bool:
        with self.lock:
            if self.owner != owner or time.monotonic() >= self.until:
                return False
            self.until = time.monotonic() + hold_s
            return True


def test_a_long_wake_pass_is_never_overlapped_by_the_next() -> None:
    """A wake pass longer than its period (and than its hold) renews its lock until it
    ends: no other worker reads the due index meanwhile."""
    running = threading.Event()
    overlaps: list[int] = []
    active = [0]

    class SlowReconciler:
        interval_s = 60.0

        def run_pass(self, *, wake: bool = True) -> None:
            pass

        def wake(self, *, keep_alive: Any = None) -> None:
            active[0] += 1
            overlaps.append(active[0])
            running.set()
            for _ in range(15):  # 0.15 s: three wake periods, five holds
                time.sleep(0.01)
                assert keep_alive()
            active[0] -= 1

    wake_lock = SharedLock()
    loops = [
        ReconcileLoop(
            SlowReconciler(),  # type: ignore[arg-type]
            SharedLock(),
            wake_s=0.05,
            wake_lock=wake_lock,
            wake_hold_s=0.03,
        )
        for _ in range(3)  # three workers sharing one wake lock
    ]
    for loop in loops:
        loop.start()
    assert running.wait(5)
    time.sleep(0.6)
    for loop in loops:
        loop.stop()
    time.sleep(0.2)
    assert len(overlaps) >= 2 and max(overlaps) == 1


def test_a_wake_lock_holder_killed_mid_pass_blocks_wake_passes_only_for_its_hold() -> None:
    wakes: list[float] = []

    class Reconciler:
        interval_s = 60.0

        def run_pass(self, *, wake: bool = True) -> None:
            assert not wake

        def wake(self, *, keep_alive: Any = None) -> None:
            wakes.append(time.monotonic())

    wake_lock = SharedLock()
    assert wake_lock.take("killed-worker", 0.3)  # its pass never ends nor renews
    killed_at = time.monotonic()
    loop = ReconcileLoop(
        Reconciler(),  # type: ignore[arg-type]
        SharedLock(),
        wake_s=0.05,
        wake_lock=wake_lock,
        wake_hold_s=0.3,
    )
    loop.start()
    time.sleep(0.8)
    loop.stop()
    assert wakes, "wake passes never resumed"
    assert 0.3 <= wakes[0] - killed_at < 0.5  # the hold, plus at most a tick or two


def test_a_wake_pass_that_lost_its_lock_stops_reading_the_due_index(w: World) -> None:
    for n in range(3):
        job, _ = w.store.create_if_absent(f"j{n}", REQ)
        assert w.handoff.handoff(job, TASK_SUBMIT, countdown=0) is not None
    w.clock.advance(3600)
    answers = iter([True, False])
    done = w.reconciler.wake(keep_alive=lambda: next(answers))
    assert len(done) == 1  # the second job was left to whoever holds the lock now
    assert len(w.reconciler.wake()) == 2  # the rest is still due


def test_a_message_stuck_behind_a_backlog_is_republished_ever_more_rarely(w: World) -> None:
    job, _ = w.store.create_if_absent("j1", REQ)
    for status in (S.SUBMITTING, S.IN_PROGRESS):
        job = w.store.update(job, JobChange(status=status)) or job
    w.handoff.publish = lambda *a: None  # sent, but it never runs (a backlog, or lost)
    assert w.handoff.handoff(job, TASK_POLL, countdown=1) is not None
    w.handoff.publish = w.rec
    republished_at = []
    for _ in range(600):  # ten minutes, a pass a second
        w.clock.advance(1)
        if w.reconciler.wake():
            republished_at.append(w.clock.now)
    gaps = [b - a for a, b in itertools.pairwise(republished_at)]
    assert len(republished_at) <= 5  # not one every 30 s (20 of them)
    assert all(later >= earlier for earlier, later in itertools.pairwise(gaps))
