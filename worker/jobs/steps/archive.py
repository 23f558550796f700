"""``runcomfy.archive(job_id, seq)``: fetch the result and stream every output into S3.

Object keys are deterministic, so a redelivered archive skips what is already stored; what
to do when a download or S3 fails is :func:`worker.jobs.decisions.decide_archive_error`.

Looking for a stored copy costs a HEAD per output (about a millisecond of CPU in botocore,
5 % of a whole job's), and only a run that follows another can find one. So every run is
counted as it reads the job (``JobStore.start_run``, the same round trip as the read): the
first run of the job, by far the most common, uploads without looking; any later one
(redelivered after a crash, retried, rerun after a lost race, a duplicate) looks first.
"""

from __future__ import annotations

import logging
import time

from api_contracts.errors import ErrorCode
from api_contracts.jobs import ArchivedOutput, JobError, JobStatus, OutputKind
from api_contracts.messages import TASK_ARCHIVE, StepMessage
from worker import metrics
from worker.errors import (
    GenerationFailedError,
    RetryableUpstreamError,
    ServiceError,
    UpstreamError,
)
from worker.jobs import decisions
from worker.jobs.handoff import Outcome, StepResult
from worker.jobs.state import JobChange, StoredJob
from worker.jobs.steps import StepContext, call_outcome
from worker.logs import log_context

log = logging.getLogger(__name__)


def archive(ctx: StepContext, msg: StepMessage) -> StepResult:
    """Run one archive message."""
    opened = ctx.handoff.open(TASK_ARCHIVE, msg, count_run=True)
    if isinstance(opened, StepResult):
        return opened
    job = opened
    with log_context(job_id=job.id, task=TASK_ARCHIVE):
        if job.status != JobStatus.ARCHIVING:
            return StepResult(Outcome.NOT_ARCHIVING, job.id)
        with log_context(request_id=job.record.request_id, attempt=job.attempt):
            started = time.monotonic()
            try:
                outputs = _copy_outputs(ctx, job)
            except ServiceError as exc:
                return _failed(ctx, job, exc)
            metrics.STAGE_SECONDS.labels("archive").observe(time.monotonic() - started)
            if not outputs:
                error = JobError(code=ErrorCode.NO_OUTPUTS, message="upstream returned no outputs")
                ctx.handoff.finish(job, JobStatus.FAILED, error)
                return StepResult(Outcome.FAILED, job.id)
            ctx.handoff.finish(
                job, JobStatus.SUCCEEDED, None, JobChange(outputs=outputs, attempt=0, since=0.0)
            )
            log.info("archived %d output(s)", len(outputs))
            return StepResult(Outcome.SUCCEEDED, job.id)


def _copy_outputs(ctx: StepContext, job: StoredJob) -> list[ArchivedOutput]:
    request_id = job.record.request_id or ""
    # The first archive run of the job: nothing of it can be in S3 yet (module docstring).
    fresh = job.runs == 1
    try:
        result = ctx.upstream.result(request_id)
        metrics.UPSTREAM_CALLS.labels("result", "ok").inc()
    except UpstreamError as exc:
        metrics.UPSTREAM_CALLS.labels("result", call_outcome(exc)).inc()
        raise
    if result.output is None:
        if result.status == "failed":
            raise GenerationFailedError(decisions.upstream_error_text(result.error))
        raise RetryableUpstreamError(f"result not ready yet (status {result.status})")
    outputs = []
    for index, (kind, url) in enumerate(result.output.media()):
        try:
            archived = ctx.archiver.archive_one(
                job_id=job.id,
                request_id=request_id,
                index=index,
                kind=OutputKind(kind),
                source_url=url,
                fresh=fresh,
            )
            metrics.UPSTREAM_CALLS.labels("download", "ok").inc()
        except ServiceError as exc:
            metrics.UPSTREAM_CALLS.labels("download", call_outcome(exc)).inc()
            raise
        outputs.append(archived)
    return outputs


def _failed(ctx: StepContext, job: StoredJob, exc: ServiceError) -> StepResult:
    if isinstance(exc, GenerationFailedError):
        error = JobError(code=ErrorCode.GENERATION_FAILED, message=str(exc))
        ctx.handoff.finish(job, JobStatus.FAILED, error)
        return StepResult(Outcome.FAILED, job.id)
    now = job.read_at
    since = job.since or now
    attempt = job.attempt + 1
    decision = decisions.decide_archive_error(
        exc,
        attempt=attempt,
        failing_for_s=now - since,
        storage_window_s=ctx.settings.s3.retry_window_s,
        jitter=ctx.rng.random(),
    )
    if isinstance(decision, decisions.Fail):
        log.warning("archive failed: %s", decision.message)
        ctx.handoff.finish(
            job, JobStatus.FAILED, JobError(code=decision.code, message=decision.message)
        )
        return StepResult(Outcome.FAILED, job.id)
    log.info("archive will retry in %.1fs: %s", decision.countdown, exc)
    ctx.handoff.handoff(
        job,
        TASK_ARCHIVE,
        countdown=decision.countdown,
        change=JobChange(attempt=attempt, since=since),
    )
    return StepResult(Outcome.RETRY, job.id)
