"""The Celery messages: queues, stable task names and bodies. Any Celery client (or a raw
Redis producer speaking Celery protocol 2 with a JSON body) can enqueue ``submit``.

Only ``submit`` is for producers; the other three are the worker's own hand-offs.
Bodies carry ids and the request, never a secret.

A raw producer pushes onto the Redis list named like the queue (``runcomfy.submit``)
a JSON envelope whose ``body`` is base64 of ``[[job_id, request], {}, {...}]`` and whose
``headers.task`` is ``runcomfy.submit`` (see README "Producing from other languages").
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from api_contracts.jobs import JobId, JobRequest

QUEUE_SUBMIT: Final = "runcomfy.submit"
QUEUE_POLL: Final = "runcomfy.poll"
QUEUE_ARCHIVE: Final = "runcomfy.archive"
QUEUE_NOTIFY: Final = "runcomfy.notify"
ALL_QUEUES: Final = (QUEUE_SUBMIT, QUEUE_POLL, QUEUE_ARCHIVE, QUEUE_NOTIFY)

TASK_SUBMIT: Final = "runcomfy.submit"
TASK_POLL: Final = "runcomfy.poll"
TASK_ARCHIVE: Final = "runcomfy.archive"
TASK_NOTIFY: Final = "runcomfy.notify"
#: Producer-initiated upstream cancel of a job waiting in upstream's queue (the worker holds
#: the RunComfy token, producers need not); runs on the submit queue.
TASK_CANCEL: Final = "runcomfy.cancel"

QUEUE_FOR_TASK: Final = {
    TASK_SUBMIT: QUEUE_SUBMIT,
    TASK_POLL: QUEUE_POLL,
    TASK_ARCHIVE: QUEUE_ARCHIVE,
    TASK_NOTIFY: QUEUE_NOTIFY,
    TASK_CANCEL: QUEUE_SUBMIT,
}


class SubmitMessage(BaseModel):
    """``runcomfy.submit(job_id, request)`` on queue ``runcomfy.submit``."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    request: JobRequest
    seq: int = Field(default=0, ge=0, description="0 from producers; retries carry more.")
    not_before: StrictFloat | StrictInt | None = Field(
        default=None, description="A hop of a long wait: not due before this epoch time."
    )


class CancelMessage(BaseModel):
    """``runcomfy.cancel(job_id)`` on queue ``runcomfy.submit``."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId


class StepMessage(BaseModel):
    """``runcomfy.poll|archive|notify(job_id, seq)``: ``seq`` is the job's hand-off number;
    a message whose ``seq`` is not the stored one is stale and does nothing."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    seq: int = Field(default=0, ge=0)
    not_before: StrictFloat | StrictInt | None = Field(
        default=None, description="A hop of a long wait: not due before this epoch time."
    )
