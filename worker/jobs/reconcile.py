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
interval, so a killed holder delays nothing) reads only the overdue jobs
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

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
            return Plan(Action.REPUBLISH, "webhook retry never ran", TASK_NOTIFY, retry)
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
        return Plan(
            Action.REPUBLISH, f"{job.outbox.task} overdue by {overdue:.0f}s", job.outbox.task, retry
        )
    return Plan(
        Action.REPUBLISH, f"{job.status.value} with nothing promised", _STEP_FOR_STATUS[job.status]
    )


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

    def run_pass(self, *, dry_run: bool = False) -> list[Reconciled]:
        """Handle (or with ``dry_run`` only list) the overdue jobs, at most ``batch``."""
        now = self.store.now()
        done = []
        for job_id, due_at in self.store.due(now, self.batch):
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
        if not dry_run:
            self._audit_slots()
            admitted = self.handoff.admit_waiting()
            if admitted:
                metrics.RECONCILED.labels("admit").inc(len(admitted))
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
            try:
                self._carry_out(job, plan)
            except ServiceError as exc:
                log.warning("reconcile %s failed: %s", plan.action.value, exc)
                self.store.set_due(job_id, now + self.handoff.grace_s + self.interval_s)
                return
            if plan.action == Action.DROP:
                self.store.set_due(job_id, None)
            elif plan.look_again_in is not None:
                self.store.set_due(job_id, now + plan.look_again_in)
            if plan.action != Action.WAIT:
                metrics.RECONCILED.labels(plan.action.value).inc()
                log.warning("reconciled: %s (%s)", plan.action.value, plan.reason)

    def _carry_out(self, job: StoredJob | None, plan: Plan) -> None:
        if job is None or plan.action in (Action.DROP, Action.WAIT):
            return
        if plan.action == Action.FAIL_DEADLINE:
            if job.status == JobStatus.IN_QUEUE and job.record.request_id:
                try:
                    self._upstream().cancel(job.record.request_id)
                except ServiceError as exc:  # best effort: the job fails either way
                    log.warning("could not cancel upstream past the deadline: %s", exc)
            error = JobError(code=ErrorCode.DEADLINE_EXCEEDED, message=plan.reason)
            self.handoff.finish(job, JobStatus.FAILED, error)
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


class ReconcileLoop:
    """Runs passes in a daemon thread: one pass per interval fleet-wide.

    Every worker looks a few times per interval; the first to take the lock (``SET NX`` with
    the interval as its expiry, never renewed) runs a pass, and nobody can run the next one
    until the lock expires. So passes come once per interval whoever runs them, and a holder
    killed mid-pass delays the next one by at most an interval.
    """

    #: Looks per interval (how late a pass can start after the lock expires: interval / this).
    TICKS_PER_INTERVAL: Final = 4

    def __init__(self, reconciler: Reconciler, lock: Callable[[str, float], bool]) -> None:
        self.reconciler = reconciler
        self._lock = lock
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
        tick = max(0.05, interval / self.TICKS_PER_INTERVAL)
        while not self._stop.wait(tick):
            try:
                if self._lock(self._owner, interval):
                    self.reconciler.run_pass()
            except Exception:  # a pass failing (Redis down …) must not end the loop
                log.exception("reconcile pass failed; next one in %.0fs", interval)


def redis_lock(client: redis.Redis) -> Callable[[str, float], bool]:
    """The pass lock on ``rcw:reconcile:lock``: ``SET NX PX`` for one interval."""

    def lock(owner: str, ttl_s: float) -> bool:
        return bool(client.set(RECONCILE_LOCK_KEY, owner, nx=True, px=max(1, int(ttl_s * 1000))))

    return lock
