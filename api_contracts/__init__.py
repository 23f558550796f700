"""Wire contract of the runcomfy-worker service: requests, records, webhook events, messages."""

from api_contracts.errors import ErrorCode
from api_contracts.inputs import DEFAULT_SIZE, SIZE_KEY, SIZES, GenerationInput, normalise_size
from api_contracts.jobs import (
    TERMINAL_STATUSES,
    ArchivedOutput,
    JobError,
    JobRecord,
    JobRequest,
    JobStatus,
    OutputKind,
    WebhookDelivery,
    WebhookEvent,
    WebhookInfo,
    WebhookState,
)

__all__ = [
    "DEFAULT_SIZE",
    "SIZES",
    "SIZE_KEY",
    "TERMINAL_STATUSES",
    "ArchivedOutput",
    "ErrorCode",
    "GenerationInput",
    "JobError",
    "JobRecord",
    "JobRequest",
    "JobStatus",
    "OutputKind",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookInfo",
    "WebhookState",
    "normalise_size",
]
