"""The sequence/outbox protocol: how one step hands a job to the next, at least once.

Every message the worker sends itself carries the job's hand-off number ``seq``:

* a hand-off is a compare-and-set that bumps ``seq`` and records the promised message in
  ``outbox`` *before* publishing it; a message whose ``seq`` is not the stored one is stale
  and returns at once, so duplicates never fork a chain;
* if a worker dies between that write and the publish, its own message is redelivered
  (acks_late) with the previous seq, finds the outbox overdue, and republishes it
  (:meth:`Handoff.is_current`);
* every hand-off also moves the job's due time in the store's due index (promised time +
  grace); a wait longer than :data:`PARK_AFTER_S` is not published at all but *parked*
  there (due exactly at the promised time), and the reconciler (``worker.jobs.reconcile``)
  publishes it when due. A message that arrives while its successor is still due is
  dropped: the due index, not a self-rescheduled message, keeps that promise;
* messages of older releases may carry ``not_before`` (a hop of a long wait); they are
  re-sent until then (:meth:`Handoff.defer_if_early`).

Steps (``worker.jobs.steps``) use only this module to move a job on; producers use it to
finish a cancelled job (``worker.jobs.cancel``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobError, JobStatus
from api_contracts.messages import TASK_NOTIFY, TASK_SUBMIT, StepMessage, SubmitMessage
from worker import metrics
from worker.errors import TransitionRefusedError
from worker.jobs.admission import Admission, NoAdmission
from worker.jobs.state import JobChange, Outbox, StoredJob
from worker.jobs.store import JobStore
from worker.logs import log_context

log = logging.getLogger(__name__)

#: Statuses before upstream has finished: a job holding a RunComfy slot is in one of these.
_BEFORE_ARCHIVING: Final = frozenset(
    {JobStatus.QUEUED, JobStatus.SUBMITTING, JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS}
)
#: Statuses in which a job is (or is about to be) in upstream.
_UPSTREAM: Final = frozenset({JobStatus.SUBMITTING, JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS})

#: How long past its due time a promised message may be missing before it is republished
#: (the default of ``RECONCILE_GRACE_S``).
OUTBOX_GRACE_S: Final = 15.0
#: Waits up to this long are countdowns held by a worker; longer ones (webhook retries,
#: long Retry-After) are parked in the due index and woken by the reconciler, so worker
#: memory holds only short countdowns.
PARK_AFTER_S: Final = 60.0


class Publisher(Protocol):
    """Sends one task message: name, positional args, kwargs, countdown in seconds."""

    def __call__(
        self, task: str, args: list[Any], kwargs: dict[str, Any], countdown: float
    ) -> None: ...


class Outcome(enum.StrEnum):
    """What a step did with its message (logs, task results, tests)."""

    SUBMITTED = "submitted"
    ALREADY_SUBMITTED = "already_submitted"
    SUBMIT_IN_PROGRESS_ELSEWHERE = "submit_in_progress_elsewhere"
    RESCHEDULED = "rescheduled"
    COMPLETED = "completed"
    NOT_POLLING = "not_polling"
    NOT_ARCHIVING = "not_archiving"
    SUCCEEDED = "succeeded"
    NOTHING_TO_SEND = "nothing_to_send"
    WEBHOOK_DELIVERED = "webhook_delivered"
    WEBHOOK_FAILED = "webhook_failed"
    CANCELLED = "cancelled"
    ALREADY_FINAL = "already_final"
    NOT_CANCELLABLE = "not_cancellable"
    CANCEL_FAILED = "cancel_failed"
    RETRY = "retry"
    FAILED = "failed"
    STALE = "stale"
    LOST_RACE = "lost_race"
    DEFERRED = "deferred"
    MALFORMED = "malformed"
    WAITING = "waiting"  # for a RunComfy slot, or for the account circuit to close


@dataclass(frozen=True)
class StepResult:
    """What a step did, for logs and tests."""

    outcome: Outcome
    job_id: str | None = None


class Handoff:
    """The seq/outbox protocol over one store and one publisher."""

    def __init__(
        self,
        store: JobStore,
        publish: Publisher,
        *,
        max_countdown_s: float,
        grace_s: float = OUTBOX_GRACE_S,
        clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.max_countdown_s = max_countdown_s
        self.grace_s = grace_s
        self.clock = clock
        self.admission: Admission = admission or NoAdmission()

    def handoff(
        self, job: StoredJob, task: str, *, countdown: float, change: JobChange | None = None
    ) -> StoredJob | None:
        """CAS the job to seq+1 with ``task`` promised in the outbox, then publish it (or,
        for a long wait, park it in the due index). None: the job changed since it was read,
        nothing was sent."""
        seq = job.seq + 1
        countdown = max(0.0, countdown)
        parked = countdown > min(PARK_AFTER_S, self.max_countdown_s)
        # due_at is on the store's clock (the job was read at job.read_at)
        outbox = Outbox(task=task, seq=seq, due_at=job.read_at + countdown)
        due_in = countdown if parked else countdown + self.grace_s
        after = self.store.update(
            job, (change or JobChange()).but(seq=seq, outbox=outbox, due_in=due_in)
        )
        if after is None:
            metrics.STALE_MESSAGES.labels(task).inc()
            log.info("job changed under us; %s not sent", task)
            return None
        self._left_upstream(job, after)
        if parked:
            metrics.PARKED_WAITS.labels(task).inc()
            log.debug("%s parked for %.0fs (the wake loop sends it when due)", task, countdown)
        else:
            self.send(task, job.id, seq, countdown)
        return after

    def finish(
        self,
        job: StoredJob,
        status: JobStatus,
        error: JobError | None,
        change: JobChange | None = None,
    ) -> StoredJob | None:
        """Move to a final state; hand off to notify when there is a webhook to send."""
        final = (change or JobChange()).but(status=status, error=error)
        if job.record.webhook is not None:
            after = self.handoff(job, TASK_NOTIFY, countdown=0, change=final)
        else:
            after = self.store.update(job, final.but(seq=job.seq + 1, outbox=None))
            if after is not None:
                self._left_upstream(job, after)
        if after is not None:
            metrics.JOBS_FINISHED.labels(status.value).inc()
            if error is not None:
                metrics.JOB_ERRORS.labels(error.code).inc()
            log.info("job %s%s", status.value, f" ({error.code}: {error.message})" if error else "")
        return after

    def _left_upstream(self, before: StoredJob, after: StoredJob) -> None:
        """A job that reached archiving or a final state frees its RunComfy slot (if it held
        one), and the slot goes to the next waiting job at once."""
        if before.status in _BEFORE_ARCHIVING and after.status not in _BEFORE_ARCHIVING:
            if after.status.is_terminal and before.status == JobStatus.QUEUED:
                self.admission.leave(after.id)  # it may have been waiting
            if self.admission.release(after.id, after.record.request):
                self.admit_waiting()

    def admit_waiting(self) -> list[str]:
        """Hand free slots to waiting jobs and send each its submit message; the ids."""
        admitted = self.admission.admit(self.store.now())
        for job_id in admitted:
            self._send_admitted(job_id)
        return admitted

    def _send_admitted(self, job_id: str) -> None:
        for _ in range(3):
            job = self.store.get(job_id)
            if job is None or job.status not in (JobStatus.QUEUED, JobStatus.SUBMITTING):
                # gone or moved on while waiting: its slot goes back
                if job is None or job.status not in _UPSTREAM:
                    self.admission.release(job_id, job.record.request if job else None)
                return
            change = JobChange(wait=None, admitted_at=job.read_at)
            if self.handoff(job, TASK_SUBMIT, countdown=0, change=change) is not None:
                log.info("job %s admitted: a RunComfy slot is free", job_id)
                return
        log.warning("job %s admitted but kept changing; the reconciler will send it", job_id)

    def send(self, task: str, job_id: str, seq: int, countdown: float) -> None:
        """Publish, splitting waits longer than the broker allows into hops (``not_before``)."""
        kwargs: dict[str, Any] = {}
        if countdown > self.max_countdown_s:
            kwargs["not_before"] = self.clock() + countdown
            countdown = self.max_countdown_s
        if task == TASK_SUBMIT:
            request = self.store.load(job_id).record.request
            assert request is not None  # only jobs with a parsed request are ever submitted
            payload = request.model_dump(mode="json", by_alias=True)
            self.publish(task, [job_id, payload], {"seq": seq, **kwargs}, countdown)
        else:
            self.publish(task, [job_id, seq], kwargs, countdown)

    def is_current(self, job: StoredJob, seq: int, task: str) -> bool:
        """Is this message the one the job expects? Otherwise it is stale: but if it is the
        message just before a hand-off whose promised message never ran, republish that."""
        if job.seq == seq:
            return True
        outbox = job.outbox
        if outbox is not None and outbox.seq == job.seq and seq == job.seq - 1:
            # The message just before a hand-off: a duplicate, or a redelivery after its
            # worker died between the hand-off's write and its publish.
            if outbox.due_at + self.grace_s <= job.read_at:
                log.warning(
                    "republishing %s seq %d: it was promised but never ran", outbox.task, outbox.seq
                )
                self.send(outbox.task, job.id, outbox.seq, 0.0)
            else:
                # Too early to tell; the due index keeps the promise (the reconciler
                # republishes it if it is still missing once overdue).
                metrics.STALE_MESSAGES.labels(task).inc()
                log.info("%s seq %d: its successor is not due yet; ignored", task, seq)
            return False
        metrics.STALE_MESSAGES.labels(task).inc()
        log.info("stale %s message (seq %d, job at %d); ignored", task, seq, job.seq)
        return False

    def defer_if_early(self, task: str, msg: StepMessage | SubmitMessage) -> bool:
        """A hop not yet due (``not_before`` in the future) is sent on again; True if so."""
        if msg.not_before is None:
            return False
        remaining = msg.not_before - self.clock()
        if remaining <= 0.5:
            return False
        self.send(task, msg.job_id, msg.seq, remaining)
        return True

    def open(
        self, task: str, msg: StepMessage, *, count_run: bool = False
    ) -> StoredJob | StepResult:
        """The job a poll/archive/notify message names, if the message is due and current.
        ``count_run``: read it with :meth:`~worker.jobs.store.JobStore.start_run` (same
        round trip), so ``job.runs`` says whether this is the step's first run on it."""
        if self.defer_if_early(task, msg):
            return StepResult(Outcome.DEFERRED, msg.job_id)
        with log_context(job_id=msg.job_id, task=task):
            if count_run:
                job = self.store.start_run(msg.job_id, task)
            else:
                job = self.store.get(msg.job_id)
            if job is None or not self.is_current(job, msg.seq, task):
                return StepResult(Outcome.STALE, msg.job_id)
        return job

    def reject(self, job_id: str | None, task: str, code: ErrorCode, message: str) -> StepResult:
        """A message we cannot act on: fail its job (if it names one) and keep going."""
        metrics.MALFORMED_MESSAGES.labels(task).inc()
        self.store.incr_stat("malformed_messages")
        log.error("%s", message[:2000])
        if job_id is None:
            return StepResult(Outcome.MALFORMED)
        error = JobError(code=code, message=message[:2000])
        with log_context(job_id=job_id, task=task):
            job, created = self.store.create_if_absent(
                job_id, None, status=JobStatus.FAILED, error=error
            )
            if created:
                metrics.JOBS_FINISHED.labels("failed").inc()
            elif not job.status.is_terminal:
                with contextlib.suppress(TransitionRefusedError):
                    self.finish(job, JobStatus.FAILED, error)
        return StepResult(Outcome.MALFORMED, job_id)
