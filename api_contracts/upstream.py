"""RunComfy Model API answers (submit / status / result / cancel), tolerant of extra fields.

Only the fields this service uses are typed; anything else upstream adds is kept
(``extra="allow"``) but never required. An unknown ``status`` fails validation, which the
client turns into a protocol error rather than a crash.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UpstreamState = Literal["in_queue", "in_progress", "completed", "cancelled", "failed"]
"""Documented states, plus ``failed``: not documented for the Model API, but RunComfy's
serverless API reports failures that way, so it is understood rather than crashing on it."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class SubmitResponse(_Tolerant):
    """Answer to ``POST /v1/models/{model_id}``."""

    request_id: str = Field(min_length=1)
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


class StatusResponse(_Tolerant):
    """Answer to ``GET /v1/requests/{id}/status``."""

    status: UpstreamState
    request_id: str | None = None
    queue_position: int | None = None
    status_url: str | None = None
    result_url: str | None = None
    error: Any = None


class ResultOutput(_Tolerant):
    """The model's output object: any of ``image``, ``images``, ``video``, ``videos``."""

    image: str | None = None
    images: list[str] | None = None
    video: str | None = None
    videos: list[str] | None = None

    def media(self) -> list[tuple[Literal["image", "video"], str]]:
        """All outputs as one ordered list: image, images…, video, videos…."""
        found: list[tuple[Literal["image", "video"], str]] = []
        if self.image:
            found.append(("image", self.image))
        found.extend(("image", u) for u in self.images or [])
        if self.video:
            found.append(("video", self.video))
        found.extend(("video", u) for u in self.videos or [])
        return found


class ResultResponse(_Tolerant):
    """Answer to ``GET /v1/requests/{id}/result``; ``output`` is set once completed."""

    status: UpstreamState | None = None
    request_id: str | None = None
    output: ResultOutput | None = None
    error: Any = None


class CancelResponse(_Tolerant):
    """Answer to ``POST /v1/requests/{id}/cancel``."""

    status: str | None = None
    request_id: str | None = None
