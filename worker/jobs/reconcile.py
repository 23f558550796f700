"""The reconciler: the job store, not the broker, guarantees that every job moves on.

Messages can be lost (a worker killed between BRPOP and kombu's bookkeeping, a failover, an
operator's FLUSH), so every job that still expects progress sits in the store's **due
index**, scored by when that progress is overdue (Redis TIME):

==========================  =========================================================
job                         overdue at
==========================  =========================================================
``queued`` (just born)      birth + ``SUBMIT_GRACE_S``: its submit message never ran
``submitting``              the submit lease's expiry + grace: the worker died mid-POST
any hand-off                the promised message's due time + ``RECONCILE_GRACE_S``
generating                  at the latest the job deadline (``JOB_DEADLINE_S``)
final, webhook pending      the promised notify + grace
==========================  =========================================================

Every ``RECONCILE_INTERVAL_S`` one worker fleet-wide (a Redis lock that expires after one
interval, so a killed holder delays nothing), and every ``RECONCILE_WAKE_S`` for the due
index alone (parked waits: status checks more than a minute apart, webhook retries, are
sent by this *wake* pass when due, so they run on time), reads only the overdue jobs
(``ZRANGEBYSCORE … LIMIT``: O(due), never a scan) and does what the missing message would
have done (:func:`decide`, a pure function):
republish the promised message, resend a submit, fail a job past its deadline (cancelling
upstream where it is still queued there), or resume its webhook. Each action is the same
compare-and-set hand-off the steps use, or a duplicate of the job's current message, which
the seq protocol makes harmless: a reconcile racing a live message costs at most one extra
status call.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import redis

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobError, JobStatus
from api_contracts.messages import TASK_ARCHIVE, TASK_NOTIFY, TASK_POLL, TASK_SUBMIT
from worker import metrics
from worker.constants import RECONCILE_LOCK_KEY
from worker.errors import ServiceError
from worker.jobs.handoff import Handoff
from worker.jobs.state import GENERATING, StoredJob, webhook_pending
from worker.jobs.steps import Upstream
from worker.jobs.store import script
from worker.logs import log_context

log = logging.getLogger(__name__)

#: The step that moves a job on from each status, when no message is promised.
_STEP_FOR_STATUS: Final = {
    JobStatus.QUEUED: TASK_SUBMIT,
    JobStatus.SUBMITTING: TASK_SUBMIT,
    JobStatus.IN_QUEUE: TASK_POLL,
    JobStatus.IN_PROGRESS: TASK_POLL,
    JobStatus.ARCHIVING: TASK_ARCHIVE,
}


#: A job holding a RunComfy slot is in one of these (admitted, submitting, or upstream).
_HOLDING: Final = frozenset(
    {JobStatus.QUEUED, JobStatus.SUBMITTING, JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS}
)


class Action(enum.StrEnum):
    """What the reconciler does for one overdue job."""

    WAKE = "wake"  # a parked wait is due: send its message (normal operation)
    REPUBLISH = "republish"  # send the promised (or the status's) message again
    RESUBMIT = "resubmit"  # a submit that never ran, or whose worker died mid-POST
    FAIL_DEADLINE = "fail_deadline"  # past JOB_DEADLINE_S: fail (cancel upstream if queued)
    RESUME_WEBHOOK = "resume_webhook"  # final, webhook owed, nothing promised
    WAIT = "wait"  # not overdue after all (a live lease): look again later
    DROP = "drop"  # nothing is expected of it any more (expired, or done)


@dataclass(frozen=True)
class Plan:
    """The decision for one job: what to do, why, and when to look again if it is still
    not moving (None: take it out of the due index)."""

    action: Action
    reason: str
    task: str | None = None
    look_again_in: float | None = None


def decide(
    job: StoredJob | None, *, now: float, deadline_s: float, interval_s: float, grace_s: float
) -> Plan:
    """What to do about an overdue job. ``now`` is the store's clock (Redis TIME)."""
    if job is None:
        return Plan(Action.DROP, "job expired or deleted")
    retry = grace_s + interval_s
    if job.status.is_terminal:
        if not webhook_pending(job) or job.record.request is None:
            return Plan(Action.DROP, f"{job.status.value}, nothing owed")
        if job.outbox is not None and job.outbox.task == TASK_NOTIFY:
            again = backed_off(retry, now - job.outbox.due_at)
            return Plan(Action.REPUBLISH, "webhook retry never ran", TASK_NOTIFY, again)
        return Plan(Action.RESUME_WEBHOOK, "final, webhook never sent", TASK_NOTIFY, retry)
    age = now - job.born_at
    lease_live = job.lease is not None and job.lease.until > now
    if job.status in GENERATING and age >= deadline_s and not lease_live:
        return Plan(Action.FAIL_DEADLINE, f"not finished after {deadline_s:.0f}s")
    if job.status == JobStatus.SUBMITTING and job.lease is not None:
        if lease_live:
            return Plan(Action.WAIT, "submit in progress", None, job.lease.until - now + 1)
        return Plan(Action.RESUBMIT, "submit lease expired without an answer", TASK_SUBMIT, retry)
    if job.status in (JobStatus.QUEUED, JobStatus.SUBMITTING) and job.outbox is None:
        return Plan(Action.RESUBMIT, "submit message never ran", TASK_SUBMIT, retry)
    if job.outbox is not None and job.outbox.seq == job.seq:
        overdue = now - job.outbox.due_at
        if overdue < 0:
            # its index entry was older than its promise (a race with the step that made
            # it): look again when the promise falls due
            return Plan(Action.WAIT, f"{job.outbox.task} not due yet", None, -overdue)
        if overdue < grace_s:
            # only a parked wait is in the index before its grace: it was never published
            return Plan(Action.WAKE, f"{job.outbox.task} parked wait due", job.outbox.task, retry)
        return Plan(
            Action.REPUBLISH,
            f"{job.outbox.task} overdue by {overdue:.0f}s",
            job.outbox.task,
            backed_off(retry, overdue),
        )
    return Plan(
        Action.REPUBLISH, f"{job.status.value} with nothing promised", _STEP_FOR_STATUS[job.status]
    )


def backed_off(retry_s: float, overdue_s: float) -> float:
    """When to look again after republishing a message overdue by ``overdue_s``: at least
    ``retry_s``, and as long again as it is already overdue. A message that is not lost but
    stuck behind a backlog (workers saturated) is then republished after 30 s, 60 s, 2 min,
    4 min …: O(log) copies of it, not one more every interval, which would feed the backlog
    that delays it."""
    return max(retry_s, overdue_s)


@dataclass(frozen=True)
class Reconciled:
    """One overdue job and what a pass did (or, dry, would do) about it."""

    job_id: str
    status: str | None
    overdue_since: float
    plan: Plan

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form (``runcomfy-worker reconcile --json``)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "overdue_since": datetime.fromtimestamp(self.overdue_since, UTC).isoformat(),
            "action": self.plan.action.value,
            "reason": self.plan.reason,
        }


class Reconciler:
    """Runs reconcile passes over one store, publishing through one Handoff."""

    def __init__(
        self,
        handoff: Handoff,
        upstream: Callable[[], Upstream],
        *,
        deadline_s: float,
        interval_s: float,
        batch: int,
    ) -> None:
        self.handoff = handoff
        self.store = handoff.store
        self._upstream = upstream
        self.deadline_s = deadline_s
        self.interval_s = interval_s
        self.batch = batch

    def run_pass(self, *, dry_run: bool = False, wake: bool = True) -> list[Reconciled]:
        """Handle (or with ``dry_run`` only list) the overdue jobs, at most ``batch``; then
        audit the RunComfy slots and admit waiting jobs. ``wake=False``: leave the due index
        to the wake passes (a loop that runs them under their own lock)."""
        done = self.wake(dry_run=dry_run) if wake else []
        if not dry_run:
            self._audit_slots()
            admitted = self.handoff.admit_waiting()
            if admitted:
                metrics.RECONCILED.labels("admit").inc(len(admitted))
        return done

    def wake(
        self, *, dry_run: bool = False, keep_alive: Callable[[], bool] | None = None
    ) -> list[Reconciled]:
        """Handle the jobs due in the due index, at most ``batch``: parked waits that are
        due, and overdue ones. O(due): a wake with nothing due is one ZRANGEBYSCORE.
        ``keep_alive`` is asked before each job (the loop renews its lock there); False: the
        lock is lost, so another pass may be reading the same jobs: stop."""
        now = self.store.now()
        done: list[Reconciled] = []
        for job_id, due_at in self.store.due(now, self.batch):
            if keep_alive is not None and not keep_alive():
                log.warning("wake pass lost its lock; stopping after %d jobs", len(done))
                break
            job = self.store.get(job_id)
            plan = decide(
                job,
                now=now,
                deadline_s=self.deadline_s,
                interval_s=self.interval_s,
                grace_s=self.handoff.grace_s,
            )
            item = Reconciled(job_id, job.status.value if job else None, due_at, plan)
            done.append(item)
            if not dry_run:
                self._act(job_id, job, plan, now)
        return done

    def _audit_slots(self) -> None:
        """Free the slots of jobs no longer in upstream (a release lost with a dead worker);
        O(slots), at most RUNCOMFY_MAX_CONCURRENCY reads."""
        admission = self.handoff.admission
        for job_id in admission.holders():
            job = self.store.get(job_id)
            gone = job is None or job.status not in _HOLDING
            if gone and admission.release(job_id, job.record.request if job else None):
                metrics.RECONCILED.labels("release_slot").inc()
                log.warning("freed the RunComfy slot of job %s (it left upstream)", job_id)

    def _act(self, job_id: str, job: StoredJob | None, plan: Plan, now: float) -> None:
        with log_context(job_id=job_id, task="reconcile"):
            # When to look again is written *before* the message goes: the step it runs then
            # writes its own next due time, which a later write here would overwrite (a
            # check planned 15 min on would come back after 30 s).
            if plan.action == Action.DROP:
                self.store.set_due(job_id, None)
            elif plan.look_again_in is not None:
                self.store.set_due(job_id, now + plan.look_again_in)
            try:
                self._carry_out(job, plan)
            except ServiceError as exc:
                log.warning("reconcile %s failed: %s", plan.action.value, exc)
                self.store.set_due(job_id, now + self.handoff.grace_s + self.interval_s)
                return
            if plan.action != Action.WAIT:
                metrics.RECONCILED.labels(plan.action.value).inc()
                if plan.action == Action.WAKE:
                    log.debug("woke: %s", plan.reason)
                else:
                    log.warning("reconciled: %s (%s)", plan.action.value, plan.reason)

    def _carry_out(self, job: StoredJob | None, plan: Plan) -> None:
        if job is None or plan.action in (Action.DROP, Action.WAIT):
            return
        if plan.action == Action.FAIL_DEADLINE:
            error = JobError(code=ErrorCode.DEADLINE_EXCEEDED, message=plan.reason)
            failed = self.handoff.finish(job, JobStatus.FAILED, error)
            # only the writer that failed the job cancels (its poll may race us here)
            if failed is not None and job.status == JobStatus.IN_QUEUE and job.record.request_id:
                try:
                    self._upstream().cancel(job.record.request_id)
                except ServiceError as exc:  # best effort: the job failed either way
                    log.warning("could not cancel upstream past the deadline: %s", exc)
            return
        if plan.action == Action.RESUME_WEBHOOK:
            self.handoff.handoff(job, TASK_NOTIFY, countdown=0)
            return
        assert plan.task is not None
        if job.outbox is None or job.outbox.seq != job.seq or plan.task != job.outbox.task:
            # nothing promised for this seq: hand off afresh (a compare-and-set)
            self.handoff.handoff(job, plan.task, countdown=0)
            return
        # the current message again: a duplicate of a live one is harmless (seq protocol)
        self.handoff.send(plan.task, job.id, job.seq, 0.0)


class PassLock(Protocol):
    """A fleet-wide pass lock: ``take(owner, hold_s)``, then ``release(owner, keep_s)``."""

    def take(self, owner: str, hold_s: float) -> bool:
        """Take the lock for at most ``hold_s`` (a killed holder delays nobody for longer)."""
        ...

    def release(self, owner: str, keep_s: float) -> None:
        """End the pass: keep the lock ``keep_s`` more (0: free it now), if still ours."""
        ...

    def renew(self, owner: str, hold_s: float) -> bool:
        """Hold it ``hold_s`` more from now; False if it is no longer ours."""
        ...


class ReconcileLoop:
    """Runs passes in a daemon thread: one full pass per interval fleet-wide, and one wake
    pass per ``wake_s`` (the due index only: parked waits run on time).

    Every worker looks a few times per period; the first to take a lock runs that pass. The
    lock is held for the whole pass and then kept for what is left of the period: passes of
    one kind never overlap, and come once per period whoever runs them.

    Only wake passes read the due index (two readers would send the same due jobs twice).
    So a wake pass holds its lock for :data:`WAKE_HOLD_S` at a time and renews it between
    jobs: a worker killed mid-pass blocks the due index for at most that long. A full pass
    may hold its lock up to :data:`MAX_PASS_S`; a killed holder delays only the slot audit.
    Without a wake lock the full pass reads the due index itself.
    """

    #: Looks per period (how late a pass can start after the lock expires: period / this).
    TICKS_PER_INTERVAL: Final = 4
    #: Longest a full pass may hold its lock; a holder killed mid-pass frees it after this.
    MAX_PASS_S: Final = 30.0
    #: How long a wake pass holds its lock between renewals (a killed holder's cost).
    WAKE_HOLD_S: Final = 3.0

    def __init__(
        self,
        reconciler: Reconciler,
        lock: PassLock,
        *,
        wake_s: float | None = None,
        wake_lock: PassLock | None = None,
        wake_hold_s: float = WAKE_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reconciler = reconciler
        self._lock = lock
        self.wake_s = wake_s
        self._wake_lock = wake_lock
        self.wake_hold_s = wake_hold_s
        self._clock = clock
        self._owner = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()

    def _run(self) -> None:
        interval = self.reconciler.interval_s
        period = min(interval, self.wake_s or interval)
        tick = max(0.05, period / self.TICKS_PER_INTERVAL)
        wake_lock, wake_s = self._wake_lock, self.wake_s
        waking = wake_lock is not None and wake_s is not None
        while not self._stop.wait(tick):
            try:
                self._pass(
                    self._lock,
                    interval,
                    lambda: self.reconciler.run_pass(wake=not waking),
                    self.MAX_PASS_S,
                )
                if wake_lock is not None and wake_s is not None:
                    self._pass(
                        wake_lock, wake_s, lambda: self._wake_pass(wake_lock), self.wake_hold_s
                    )
            except Exception:  # a pass failing (Redis down …) must not end the loop
                log.exception("reconcile pass failed; next one in %.1fs", tick)

    def _wake_pass(self, lock: PassLock) -> None:
        """One wake pass, renewing ``lock`` every third of its hold."""
        renewed = [self._clock()]

        def keep_alive() -> bool:
            now = self._clock()
            if now - renewed[0] < self.wake_hold_s / 3:
                return True
            renewed[0] = now
            return lock.renew(self._owner, self.wake_hold_s)

        self.reconciler.wake(keep_alive=keep_alive)

    def _pass(
        self, lock: PassLock, period_s: float, run: Callable[[], object], hold_s: float
    ) -> bool:
        """Run one pass under ``lock`` if it is free; whether it ran."""
        started = self._clock()
        if not lock.take(self._owner, max(period_s, hold_s)):
            return False
        try:
            run()
        finally:
            lock.release(self._owner, period_s - (self._clock() - started))
        return True


class RedisPassLock:
    """A :class:`PassLock` on one Redis key: ``SET NX PX`` to take, ``scripts/unlock.lua``
    to end the pass (``rcw:reconcile:lock``, or ``rcw:wake:lock`` for wake passes)."""

    def __init__(self, client: redis.Redis, key: str = RECONCILE_LOCK_KEY) -> None:
        self.redis = client
        self.key = key
        self._unlock = client.register_script(script("unlock.lua"))

    def take(self, owner: str, hold_s: float) -> bool:
        """``SET NX PX``."""
        return bool(self.redis.set(self.key, owner, nx=True, px=max(1, int(hold_s * 1000))))

    def release(self, owner: str, keep_s: float) -> None:
        """Keep it for ``keep_s`` more, or free it."""
        self._unlock(keys=[self.key], args=[owner, int(keep_s * 1000)])

    def renew(self, owner: str, hold_s: float) -> bool:
        """``PEXPIRE`` if still ours (``scripts/unlock.lua`` with time left)."""
        return bool(self._unlock(keys=[self.key], args=[owner, max(1, int(hold_s * 1000))]))


def redis_lock(client: redis.Redis, key: str = RECONCILE_LOCK_KEY) -> RedisPassLock:
    """The pass lock on ``key`` (``rcw:reconcile:lock`` by default)."""
    return RedisPassLock(client, key)
