"""The producer side, minimal: validate a request, create the job record, enqueue submit;
read records back. The Python client and the CLI (worker.producer.client, worker.cli) build on this.

The submit message is small JSON: ``runcomfy.submit(job_id, request)`` on queue
``runcomfy.submit`` (see api_contracts.messages); nothing secret travels in it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from pydantic import ValidationError

from api_contracts.jobs import JobRecord, JobRequest, JobStatus
from api_contracts.messages import TASK_SUBMIT
from worker.errors import InvalidRequestError, TargetForbiddenError
from worker.queueing.publish import send_message
from worker.runtime import Runtime


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
        req = self._checked(request)
        job_id = job_id or new_job_id()
        if req.idempotency_key:
            job_id = self.rt.store.claim_idempotency_key(req.idempotency_key, job_id, req)
        job, _created = self.rt.store.create_if_absent(job_id, req)
        if job.status == JobStatus.QUEUED and job.seq == 0:
            # Also when not created: a producer that died between create and send retries
            # with the same idempotency key; a duplicate submit message is harmless.
            args, kwargs = submit_message(job_id, req)
            send_message(self.app, TASK_SUBMIT, args, kwargs)
        return job.record

    def enqueue_many(self, requests: Sequence[JobRequest | dict[str, Any]]) -> list[JobRecord]:
        """Like :meth:`enqueue` for many requests, in a few round trips: every request is
        validated first (InvalidRequestError names ``[i].field``; nothing is queued), records
        are created in one pipeline and the messages published in one batch."""
        checked: list[JobRequest] = []
        problems: list[tuple[str, str]] = []
        for i, request in enumerate(requests):
            try:
                checked.append(self._checked(request))
            except InvalidRequestError as exc:
                problems += [(f"[{i}].{field}", reason) for field, reason in exc.errors]
        if problems:
            raise InvalidRequestError(problems)
        ids = [
            self.rt.store.claim_idempotency_key(r.idempotency_key, new_job_id(), r)
            if r.idempotency_key
            else new_job_id()
            for r in checked
        ]
        born = self.rt.store.create_many(list(zip(ids, checked, strict=True)))
        jobs = [
            job if job is not None else self.rt.store.load(job_id)
            for job_id, job in zip(ids, born, strict=True)
        ]
        to_send = [
            (job.id, req)
            for job, req in zip(jobs, checked, strict=True)
            if job.status == JobStatus.QUEUED and job.seq == 0
        ]
        with self.app.producer_or_acquire() as kombu_producer, _batch(kombu_producer):
            for job_id, req in to_send:
                args, kwargs = submit_message(job_id, req)
                send_message(self.app, TASK_SUBMIT, args, kwargs, producer=kombu_producer)
        return [job.record for job in jobs]

    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFoundError when unknown or expired. A job waiting for a
        RunComfy slot shows its current position (read now, not stored)."""
        record = self.rt.store.load(job_id).record
        if record.wait is None or record.status.is_terminal:
            return record
        position = self.rt.admission.position(record.id, record.request)
        return record.model_copy(
            update={"wait": record.wait.model_copy(update={"position": position})}
        )

    def _checked(self, request: JobRequest | dict[str, Any]) -> JobRequest:
        """Parse and vet one request (webhook URL shape included)."""
        req = parse_request(request)
        if req.webhook_url:
            try:
                self.rt.guard.check_url_shape(req.webhook_url)
            except TargetForbiddenError as exc:
                raise InvalidRequestError([("webhook_url", str(exc))]) from None
        return req


def _batch(kombu_producer: Any) -> contextlib.AbstractContextManager[Any]:
    """kombu's ``Producer.batch()`` (one pipelined LPUSH per flush; kombu 5.7+), else nothing."""
    batch = getattr(kombu_producer, "batch", None)
    return batch() if batch is not None else contextlib.nullcontext()
