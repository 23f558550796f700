"""``runcomfy.cancel(job_id)``: a producer asked to cancel; the outcome is the job record.

``queued``: cancelled in the store. ``in_queue``: cancelled upstream, then in the store.
Anything later: upstream cannot cancel running work, so the cancel is refused, and the
job's status is refreshed at once so the producer waiting on the record learns why.
"""

from __future__ import annotations

import logging

from api_contracts.jobs import JobStatus
from api_contracts.messages import TASK_CANCEL, CancelMessage
from worker import metrics
from worker.errors import NotCancellableError, ServiceError
from worker.jobs.cancel import cancel_queued, mark_cancelled_upstream
from worker.jobs.handoff import Outcome, StepResult
from worker.jobs.state import JobChange, StoredJob
from worker.jobs.steps import StepContext
from worker.logs import log_context

log = logging.getLogger(__name__)


def cancel(ctx: StepContext, msg: CancelMessage) -> StepResult:
    """Run one cancel message."""
    with log_context(job_id=msg.job_id, task=TASK_CANCEL):
        try:
            job = _cancel(ctx, msg.job_id)
        except NotCancellableError as exc:
            log.info("cancel refused: %s", exc)
            _refresh_after_refused_cancel(ctx, msg.job_id)
            return StepResult(Outcome.NOT_CANCELLABLE, msg.job_id)
        except ServiceError as exc:
            log.warning("cancel failed: %s", exc)
            return StepResult(Outcome.CANCEL_FAILED, msg.job_id)
    cancelled = job.status == JobStatus.CANCELLED
    return StepResult(Outcome.CANCELLED if cancelled else Outcome.ALREADY_FINAL, msg.job_id)


def _cancel(ctx: StepContext, job_id: str) -> StoredJob:
    done = cancel_queued(ctx.handoff, job_id)
    if done is not None:
        return done
    job = ctx.store.load(job_id)
    if job.status.is_terminal:
        return job
    if job.status == JobStatus.IN_QUEUE and job.record.request_id:
        ctx.upstream.cancel(job.record.request_id)  # NotCancellableError propagates
        metrics.UPSTREAM_CALLS.labels("cancel", "ok").inc()
        return mark_cancelled_upstream(ctx.handoff, job_id)
    raise NotCancellableError.for_job(job_id, job.status)


def _refresh_after_refused_cancel(ctx: StepContext, job_id: str) -> None:
    """Upstream refused to cancel: it has started. Record that now, so the producer waiting
    on the record learns it at once instead of at the next scheduled status check."""
    job = ctx.store.get(job_id)
    if job is None or job.status != JobStatus.IN_QUEUE or not job.record.request_id:
        return
    try:
        answer = ctx.upstream.status(job.record.request_id)
    except ServiceError:
        return  # the poll chain will catch up
    if answer.status == "in_progress":
        # status only: seq and outbox stay, so the poll chain carries on untouched
        ctx.store.update(job, JobChange(status=JobStatus.IN_PROGRESS, queue_position=None))
