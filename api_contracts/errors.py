"""Error codes a job can end with; stable strings that producers may switch on."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a job failed or was cancelled (``JobRecord.error.code``)."""

    INVALID_REQUEST = "invalid_request"
    MALFORMED_MESSAGE = "malformed_message"
    UPSTREAM_REJECTED = "upstream_rejected"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    UPSTREAM_EXPIRED = "upstream_expired"
    GENERATION_FAILED = "generation_failed"
    UPSTREAM_CANCELLED = "upstream_cancelled"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NO_OUTPUTS = "no_outputs"
    OUTPUT_UNAVAILABLE = "output_unavailable"
    OUTPUT_TOO_LARGE = "output_too_large"
    OUTPUT_FORBIDDEN = "output_forbidden"
    STORAGE_ERROR = "storage_error"
    INTERNAL_ERROR = "internal_error"
    SUBMIT_AMBIGUOUS = "submit_ambiguous"
