"""The steps of a job, one module each: submit → poll … → archive → notify, and cancel.

A step takes a parsed message (``api_contracts.messages``) and a :class:`StepContext`, talks
to the outside systems through the narrow protocols below, moves the job on with
:mod:`worker.jobs.handoff`, and returns a :class:`~worker.jobs.handoff.StepResult`. Celery
tasks (``worker.queueing.tasks``) only parse messages and call these; unit tests call them
with :class:`~worker.jobs.memory.InMemoryJobStore`, a recording publisher and a fixed clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from api_contracts.inputs import GenerationInput
from api_contracts.jobs import ArchivedOutput, OutputKind
from api_contracts.upstream import CancelResponse, ResultResponse, StatusResponse, SubmitResponse
from worker.errors import PermanentUpstreamError, RetryableUpstreamError, UpstreamProtocolError
from worker.jobs import runtimes
from worker.jobs.handoff import Handoff
from worker.jobs.runtimes import Learned, NoRuntimes, RuntimeBook, runtime_kind
from worker.jobs.state import StoredJob
from worker.jobs.store import JobStore
from worker.services.webhooks import DeliveryResult
from worker.settings import Settings


class Upstream(Protocol):
    """The RunComfy calls the steps make (``worker.services.runcomfy.RunComfyClient``)."""

    def submit(self, inp: GenerationInput) -> SubmitResponse:
        """POST a generation; its request id."""
        ...

    def status(self, request_id: str) -> StatusResponse:
        """The request's status."""
        ...

    def result(self, request_id: str) -> ResultResponse:
        """The request's result (outputs once completed)."""
        ...

    def cancel(self, request_id: str) -> CancelResponse:
        """Cancel a queued request."""
        ...


class OutputArchiver(Protocol):
    """Copies one output into S3 (``worker.services.s3.Archiver``)."""

    def archive_one(
        self,
        *,
        job_id: str,
        request_id: str,
        index: int,
        kind: OutputKind,
        source_url: str,
        fresh: bool = False,
    ) -> ArchivedOutput:
        """Stream ``source_url`` into the job's deterministic key; the archived output.
        ``fresh``: no earlier archive run of the job can have stored anything, so there is
        no copy to look for first."""
        ...


class WebhookDeliverer(Protocol):
    """One signed delivery attempt (``worker.services.webhooks.WebhookSender``)."""

    def deliver(self, url: str, msg_id: str, body: bytes, *, timestamp: int) -> DeliveryResult:
        """POST ``body`` signed with ``msg_id`` and ``timestamp``; the classified outcome."""
        ...


class Services(Protocol):
    """The outside systems, each built on first use (a worker with no webhook secret can
    still run jobs without webhooks): :class:`worker.runtime.Runtime` in production."""

    @property
    def upstream(self) -> Upstream:
        """RunComfy."""
        ...

    @property
    def archiver(self) -> OutputArchiver:
        """S3."""
        ...

    @property
    def webhooks(self) -> WebhookDeliverer:
        """Webhook deliveries."""
        ...


@dataclass
class StepContext:
    """Everything a step needs: settings, the store, the hand-off protocol, outside systems,
    and the clock and randomness (injected, so decisions are reproducible in tests)."""

    settings: Settings
    store: JobStore
    handoff: Handoff
    services: Services
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    #: learned run times (the status schedule's input); none: behave as on a cold start
    runtimes: RuntimeBook = field(default_factory=NoRuntimes)
    #: job id -> upstream request id of POSTs this process made but could not record (Redis
    #: was away); the retried submit records it instead of POSTing again
    unrecorded: dict[str, str] = field(default_factory=dict)

    @property
    def upstream(self) -> Upstream:
        """RunComfy."""
        return self.services.upstream

    @property
    def archiver(self) -> OutputArchiver:
        """S3."""
        return self.services.archiver

    @property
    def webhooks(self) -> WebhookDeliverer:
        """Webhook deliveries."""
        return self.services.webhooks


def learned_runtimes(ctx: StepContext, job: StoredJob) -> tuple[str | None, Learned]:
    """The job's run-time kind (None without a parsed request) and what is learned of it
    (nothing when learning is off or nothing is known)."""
    request = job.record.request
    if request is None:
        return None, Learned()
    kind = runtime_kind(ctx.settings.runcomfy.model_id, request.input)
    return kind, runtimes.read(ctx.runtimes, kind) if ctx.settings.poll.learn else Learned()


def call_outcome(exc: BaseException) -> str:
    """The ``outcome`` label of an upstream call that raised ``exc`` (metrics)."""
    if isinstance(exc, RetryableUpstreamError):
        return "retryable"
    if isinstance(exc, PermanentUpstreamError):
        return "permanent"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    return "retryable" if getattr(exc, "retryable", False) else "permanent"
