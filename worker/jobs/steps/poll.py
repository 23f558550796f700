"""``runcomfy.poll(job_id, seq)``: one status check, then reschedule, archive or finish.

When to look again, and what an answer means, is :func:`worker.jobs.decisions.decide_poll`;
its inputs are the job's earlier checks (:class:`~worker.jobs.decisions.Observed`) and the
run times learned from earlier jobs of its kind (:mod:`worker.jobs.runtimes`), which this
step feeds with every job it sees finish. A check that changes nothing is a check-only
write (``check.lua``), and logs nothing.
"""

from __future__ import annotations

import logging

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobError, JobStatus
from api_contracts.messages import TASK_ARCHIVE, TASK_POLL, StepMessage
from api_contracts.upstream import StatusResponse
from worker import metrics
from worker.errors import ServiceError, UpstreamError
from worker.jobs import decisions, runtimes
from worker.jobs.handoff import Outcome, StepResult
from worker.jobs.state import JobChange, StoredJob
from worker.jobs.steps import StepContext, call_outcome, learned_runtimes
from worker.logs import log_context

log = logging.getLogger(__name__)


def poll(ctx: StepContext, msg: StepMessage) -> StepResult:
    """Run one poll message."""
    opened = ctx.handoff.open(TASK_POLL, msg)
    if isinstance(opened, StepResult):
        return opened
    job = opened
    with log_context(job_id=job.id, task=TASK_POLL):
        if job.status not in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS):
            return StepResult(Outcome.NOT_POLLING, job.id)
        request_id = job.record.request_id or ""
        with log_context(request_id=request_id, attempt=job.attempt):
            answer: StatusResponse | ServiceError
            try:
                answer = ctx.upstream.status(request_id)
                metrics.UPSTREAM_CALLS.labels("status", "ok").inc()
            except UpstreamError as exc:
                metrics.UPSTREAM_CALLS.labels("status", call_outcome(exc)).inc()
                answer = exc
            return _act(ctx, job, answer)


def _act(ctx: StepContext, job: StoredJob, answer: StatusResponse | ServiceError) -> StepResult:
    calls = job.record.status_calls + 1
    submitted = (job.record.submitted_at or job.record.created_at).timestamp()
    elapsed = job.read_at - submitted
    if job.outbox is not None and job.outbox.seq == job.seq and job.outbox.task == TASK_POLL:
        metrics.CHECK_LATENESS.observe(max(0.0, job.read_at - job.outbox.due_at))
    kind, learned = learned_runtimes(ctx, job)
    before = decisions.Observed(
        elapsed,
        queued_s=job.queued_ts - submitted if job.queued_ts else 0.0,
        started_s=job.started_ts - submitted if job.started_ts else None,
    )
    seen = before.seen(answer.status) if isinstance(answer, StatusResponse) else before
    previous_check = job.checked_ts - submitted if job.checked_ts else 0.0
    decision = decisions.decide_poll(
        status=job.status,
        answer=answer,
        elapsed_s=elapsed,
        age_s=job.age_s,
        deadline_s=ctx.settings.job.deadline_s,
        error_streak=job.attempt,
        poll=ctx.settings.poll,
        jitter=ctx.rng.random(),
        seen=seen,
        learned=learned,
    )
    marks = JobChange(checked_ts=job.read_at)
    if seen.queued_s != before.queued_s:
        marks = marks.but(queued_ts=submitted + seen.queued_s)
    if seen.started_s is not None and before.started_s is None:
        marks = marks.but(started_ts=submitted + seen.started_s)
    if isinstance(decision, decisions.Reschedule):
        metrics.SCHEDULE_CHECKS.labels("learned" if decision.learned else "fallback").inc()
        change = marks.but(
            status_calls=calls,
            attempt=0 if isinstance(answer, StatusResponse) else job.attempt + 1,
        )
        if decision.status is not None:
            change = change.but(status=decision.status, queue_position=decision.queue_position)
            if decision.status == JobStatus.IN_PROGRESS and job.status == JobStatus.IN_QUEUE:
                metrics.STAGE_SECONDS.labels("upstream_queue").observe(elapsed)
        after = ctx.handoff.handoff(job, TASK_POLL, countdown=decision.countdown, change=change)
        return StepResult(Outcome.RESCHEDULED if after else Outcome.LOST_RACE, job.id)
    if isinstance(decision, decisions.FetchResult) and kind is not None:
        _learn(ctx, kind, seen, previous_check)
    metrics.STATUS_CALLS_PER_JOB.observe(calls)
    if isinstance(decision, decisions.FetchResult):
        metrics.STAGE_SECONDS.labels("generation").observe(elapsed)
        after = ctx.handoff.handoff(
            job,
            TASK_ARCHIVE,
            countdown=0,
            change=JobChange(
                status=JobStatus.ARCHIVING,
                status_calls=calls,
                queue_position=None,
                attempt=0,
                since=0.0,
            ),
        )
        return StepResult(Outcome.COMPLETED if after else Outcome.LOST_RACE, job.id)
    final = JobChange(status_calls=calls, queue_position=None)
    if isinstance(decision, decisions.MarkCancelled):
        error = JobError(code=ErrorCode.UPSTREAM_CANCELLED, message=decision.message)
        ctx.handoff.finish(job, JobStatus.CANCELLED, error, final)
        return StepResult(Outcome.CANCELLED, job.id)
    error = JobError(code=decision.code, message=decision.message)
    failed = ctx.handoff.finish(job, JobStatus.FAILED, error, final)
    if failed is not None and isinstance(decision, decisions.CancelUpstreamAndFail):
        # only the writer that failed the job cancels (the reconciler may race us here)
        _cancel_upstream_quietly(ctx, job)
    return StepResult(Outcome.FAILED, job.id)


def _learn(ctx: StepContext, kind: str, seen: decisions.Observed, previous_check: float) -> None:
    """Add this job's timings to its kind's sketches: best effort (the job goes on anyway)."""
    samples = decisions.learned_samples(seen, previous_check, ctx.settings.poll)
    try:
        runtimes.teach(ctx.runtimes, kind, samples)
    except Exception as exc:  # learning must never fail a finished generation
        log.warning("could not record the run time (%.1fs): %s", samples.total_s, exc)


def _cancel_upstream_quietly(ctx: StepContext, job: StoredJob) -> None:
    try:
        ctx.upstream.cancel(job.record.request_id or "")
        metrics.UPSTREAM_CALLS.labels("cancel", "ok").inc()
    except ServiceError as exc:  # best effort: the job fails either way
        metrics.UPSTREAM_CALLS.labels("cancel", call_outcome(exc)).inc()
        log.warning("could not cancel upstream request past the deadline: %s", exc)
