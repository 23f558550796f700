"""The producer side, minimal: validate a request, create the job record, enqueue submit;
read records back. The Python client and the CLI (worker.client, worker.cli) build on this.

The submit message is small JSON: ``runcomfy.submit(job_id, request)`` on queue
``runcomfy.submit`` (see api_contracts.messages); nothing secret travels in it.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from pydantic import ValidationError

from api_contracts.jobs import JobRecord, JobRequest, JobStatus
from api_contracts.messages import QUEUE_SUBMIT, TASK_SUBMIT
from worker.errors import ServiceError, TargetForbiddenError
from worker.runtime import Runtime


class InvalidRequestError(ServiceError, ValueError):
    """The request does not validate; ``errors`` lists ``(field, reason)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in errors))

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidRequestError:
        """Build from pydantic's error list, naming each field with its dotted path."""
        return cls(
            [
                (".".join(str(p) for p in e["loc"]) or "request", _reason(e["msg"]))
                for e in exc.errors()
            ]
        )


def _reason(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def new_job_id() -> str:
    """A fresh job id (32 hex characters)."""
    return uuid.uuid4().hex


def parse_request(data: JobRequest | dict[str, Any]) -> JobRequest:
    """Validate a request; InvalidRequestError names every bad field and why."""
    if isinstance(data, JobRequest):
        return data
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation(exc) from None


def submit_message(job_id: str, request: JobRequest) -> tuple[list[Any], dict[str, Any]]:
    """The ``(args, kwargs)`` of the submit task for a job: JSON-only, no secrets."""
    return [job_id, request.model_dump(mode="json", by_alias=True, exclude_none=True)], {}


class Producer:
    """Creates jobs and enqueues them; reads records. Thread-safe, no global state."""

    def __init__(self, runtime: Runtime, celery_app: Celery) -> None:
        self.rt = runtime
        self.app = celery_app

    def enqueue(
        self, request: JobRequest | dict[str, Any], *, job_id: str | None = None
    ) -> JobRecord:
        """Validate, create the record (``queued``) and enqueue submit; idempotent by key."""
        req = parse_request(request)
        if req.webhook_url:
            try:
                self.rt.guard.check_url_shape(req.webhook_url)
            except TargetForbiddenError as exc:
                raise InvalidRequestError([("webhook_url", str(exc))]) from None
        job_id = job_id or new_job_id()
        if req.idempotency_key:
            job_id = self.rt.store.claim_idempotency_key(req.idempotency_key, job_id, req)
        job, _created = self.rt.store.create_if_absent(job_id, req)
        if job.status == JobStatus.QUEUED and job.seq == 0:
            # Also when not created: a producer that died between create and send retries
            # with the same idempotency key; a duplicate submit message is harmless.
            args, kwargs = submit_message(job_id, req)
            self.app.send_task(
                TASK_SUBMIT, args=args, kwargs=kwargs, queue=QUEUE_SUBMIT, routing_key=QUEUE_SUBMIT
            )
        return job.record

    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFoundError when unknown or expired."""
        return self.rt.store.load(job_id).record
