"""The job contract: what producers send (``JobRequest``), what the service keeps and returns
(``JobRecord``), and what it POSTs to the producer's webhook (``WebhookEvent``)."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from api_contracts.inputs import GenerationInput

IDEMPOTENCY_KEY_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
METADATA_MAX_BYTES: Final = 4096
WEBHOOK_URL_MAX_CHARS: Final = 2048

JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
#: Who a job is for: same characters as an idempotency key. Jobs of different tenants share
#: RunComfy's capacity fairly (round-robin), whatever the size of each tenant's batch.
Tenant = Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)]
Priority = Literal["high", "normal", "low"]
PRIORITIES: Final[tuple[Priority, ...]] = ("high", "normal", "low")


def _check_webhook_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("webhook_url must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("webhook_url must name a host")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not carry credentials")
    if len(value) > WEBHOOK_URL_MAX_CHARS:
        raise ValueError(f"webhook_url must be at most {WEBHOOK_URL_MAX_CHARS} characters")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"webhook_url has an invalid port: {exc}") from None
    return value


WebhookUrl = Annotated[str, AfterValidator(_check_webhook_url)]


class JobStatus(StrEnum):
    """Where a job is. ``succeeded``, ``failed`` and ``cancelled`` are final."""

    QUEUED = "queued"
    SUBMITTING = "submitting"
    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    ARCHIVING = "archiving"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for the three final states."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobRequest(BaseModel):
    """What a producer asks for: one generation, where to call back, how to correlate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: GenerationInput
    webhook_url: WebhookUrl | None = Field(
        default=None, description="Where to POST the signed WebhookEvent when the job ends."
    )
    idempotency_key: Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)] | None = (
        Field(
            default=None,
            description="Same key + same request, same job; at most 128 of [A-Za-z0-9._:-].",
        )
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Free string pairs (at most 4 KB as JSON), echoed in the record and webhook.",
    )
    tenant: Tenant | None = Field(
        default=None,
        description="Who the job is for (1 to 128 of [A-Za-z0-9._:-]): waiting jobs get free "
        "RunComfy slots round-robin across tenants. None: the shared default tenant.",
    )
    priority: Priority = Field(
        default="normal",
        description="high before normal before low when jobs wait for a RunComfy slot.",
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, str]) -> dict[str, str]:
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; at most {METADATA_MAX_BYTES}")
        return value


class OutputKind(StrEnum):
    """What an archived output is."""

    IMAGE = "image"
    VIDEO = "video"


class ArchivedOutput(BaseModel):
    """One upstream output, copied into S3."""

    model_config = ConfigDict(extra="forbid")

    kind: OutputKind
    index: int = Field(ge=0, description="Position in the normalised output list, from 0.")
    source_url: str = Field(description="Where upstream served it (may expire).")
    s3_uri: str
    bucket: str
    key: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_type: str
    url: str | None = Field(default=None, description="Presigned GET URL, valid for a while.")


class JobError(BaseModel):
    """Why a job failed or was cancelled."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="A stable code from api_contracts.errors.ErrorCode.")
    message: str


class WebhookDelivery(BaseModel):
    """One attempt to deliver the job's webhook."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1)
    at: AwareDatetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None


class WebhookState(StrEnum):
    """Delivery state of a job's webhook."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookInfo(BaseModel):
    """The job's webhook: its fixed id, how delivery went, and every attempt."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The webhook-id header, the same on every attempt.")
    state: WebhookState = WebhookState.PENDING
    deliveries: list[WebhookDelivery] = Field(default_factory=list)


class WaitInfo(BaseModel):
    """Why a ``queued`` job has not been sent upstream yet, and where it stands."""

    model_config = ConfigDict(extra="forbid")

    reason: Literal["slot", "paused"] = Field(
        description="slot: waiting for a free RunComfy slot (RUNCOMFY_MAX_CONCURRENCY, "
        "TENANT_MAX_CONCURRENCY); paused: submissions are paused fleet-wide (account error)."
    )
    since: AwareDatetime
    position: int | None = Field(
        default=None, ge=0, description="Jobs ahead of it in its tenant and priority (0: next)."
    )


class JobRecord(BaseModel):
    """Everything the service knows about one job; the job store is its single source of truth."""

    model_config = ConfigDict(extra="forbid")

    id: JobId
    status: JobStatus
    created_at: AwareDatetime
    updated_at: AwareDatetime
    submitted_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    request_id: str | None = Field(default=None, description="Upstream's request id.")
    queue_position: int | None = None
    wait: WaitInfo | None = Field(
        default=None, description="Set while a queued job waits for a RunComfy slot."
    )
    request: JobRequest | None = Field(
        default=None, description="The request; null only when it could not be parsed."
    )
    outputs: list[ArchivedOutput] = Field(default_factory=list)
    error: JobError | None = None
    webhook: WebhookInfo | None = None
    status_calls: int = Field(default=0, ge=0, description="Upstream status calls made.")
    notes: list[str] = Field(default_factory=list, description="Operational remarks.")

    @property
    def metadata(self) -> dict[str, str]:
        """The producer's metadata (empty if the request could not be parsed)."""
        return dict(self.request.metadata) if self.request else {}


EventType = Literal["job.succeeded", "job.failed", "job.cancelled"]

EVENT_FOR_STATUS: Final[dict[JobStatus, EventType]] = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}


class WebhookEvent(BaseModel):
    """The body POSTed to ``webhook_url`` when a job reaches a final state."""

    model_config = ConfigDict(extra="forbid")

    type: EventType
    timestamp: datetime
    data: JobRecord
