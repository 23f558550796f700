"""Cancelling a job in the store: shared by producers (``Client.cancel``) and the worker's
``runcomfy.cancel`` step, so the compare-and-set retry loop exists once.

A job still ``queued`` has never been sent upstream: it is cancelled right here, by whoever
asks. A job in upstream's queue needs upstream's cancel first, which only the worker (the
holder of the RunComfy token) makes; see ``worker.jobs.steps.cancel``.
"""

from __future__ import annotations

from typing import Final

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobError, JobStatus
from worker.errors import TryAgainError
from worker.jobs.handoff import Handoff
from worker.jobs.state import JobChange, StoredJob

#: Compare-and-set attempts before giving up on a job that keeps changing.
CAS_ATTEMPTS: Final = 5


def cancel_queued(handoff: Handoff, job_id: str) -> StoredJob | None:
    """Cancel a job that was never sent upstream. Returns the job once final (cancelled now,
    or already final), or None when it has left ``queued`` (a worker is submitting it).
    JobNotFoundError for an unknown job; TryAgainError if it keeps changing."""
    return _finish_cancelled(
        handoff, job_id, "cancelled before submission", only_from=JobStatus.QUEUED
    )


def mark_cancelled_upstream(handoff: Handoff, job_id: str) -> StoredJob:
    """Upstream accepted our cancel of the job's request: record the job as cancelled."""
    done = _finish_cancelled(
        handoff, job_id, "cancelled by the producer", change=JobChange(queue_position=None)
    )
    assert done is not None  # only_from=None never returns None
    return done


def _finish_cancelled(
    handoff: Handoff,
    job_id: str,
    message: str,
    *,
    only_from: JobStatus | None = None,
    change: JobChange | None = None,
) -> StoredJob | None:
    error = JobError(code=ErrorCode.CANCELLED, message=message)
    for _ in range(CAS_ATTEMPTS):
        job = handoff.store.load(job_id)
        if job.status.is_terminal:
            return job
        if only_from is not None and job.status != only_from:
            return None
        done = handoff.finish(job, JobStatus.CANCELLED, error, change)
        if done is not None:
            return done
    raise TryAgainError(f"job {job_id} kept changing while cancelling; try again in a moment")
