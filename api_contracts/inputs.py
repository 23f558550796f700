"""The model's input schema (bytedance/dreamina-4-0/text-to-image), exactly as upstream has it.

On the wire the size travels under the literal key ``width×height`` (U+00D7). In Python
and on the command line it is called ``size``, and the short form ``2048x2048`` is
accepted and normalised to the enum value ``2048x2048(1:1)``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

#: The wire key of the size field: "width", MULTIPLICATION SIGN (U+00D7), "height".
SIZE_KEY: Final = "width\u00d7height"

#: The eleven sizes upstream accepts, in upstream's order.
SIZES: Final[tuple[str, ...]] = (
    "1024x1024(1:1)",
    "2048x2048(1:1)",
    "2304x1728(4:3)",
    "2496x1664(3:2)",
    "2560x1440(16:9)",
    "3024x1296(21:9)",
    "4096x4096(1:1)",
    "4694x3520(4:3)",
    "4992x3328(3:2)",
    "5404x3040(16:9)",
    "6198x2656(21:9)",
)
DEFAULT_SIZE: Final = "2048x2048(1:1)"
PROMPT_MAX_CHARS: Final = 800
DEFAULT_SCALE: Final = 0.5

_SHORT_TO_FULL: Final = {s.split("(", 1)[0]: s for s in SIZES}


def normalise_size(value: str) -> str:
    """Map ``2048x2048`` or ``2048x2048(1:1)`` (any case, ``×`` or ``x``) to the enum value."""
    text = value.strip().lower().replace("\u00d7", "x").replace(" ", "")
    if text in SIZES:
        return text
    short = text.split("(", 1)[0]
    full = _SHORT_TO_FULL.get(short)
    if full is None or text not in (short, full):
        allowed = ", ".join(SIZES)
        raise ValueError(f"{value!r} is not an allowed size; allowed: {allowed}")
    return full


def size_dimensions(size: str) -> tuple[int, int]:
    """Return ``(width, height)`` in pixels for an enum value or short form."""
    w, h = normalise_size(size).split("(", 1)[0].split("x")
    return int(w), int(h)


class GenerationInput(BaseModel):
    """Input of one text-to-image generation, validated exactly like upstream's schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    prompt: Annotated[
        str,
        Field(
            min_length=1,
            max_length=PROMPT_MAX_CHARS,
            description="What to draw; 1 to 800 characters, not only whitespace.",
        ),
    ]
    # Defaults after "=", not in Field(): pydantic's mypy plugin only sees them there.
    size: Annotated[
        str,
        Field(
            alias=SIZE_KEY,
            json_schema_extra={"enum": list(SIZES)},
            description="Output size: an enum value (the short form 2048x2048 is accepted).",
        ),
    ] = DEFAULT_SIZE
    scale: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            strict=False,
            description="How strongly the prompt steers the result, 0..1.",
        ),
    ] = DEFAULT_SCALE
    force_single: Annotated[
        StrictBool, Field(description="Ask upstream for exactly one image.")
    ] = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain something other than whitespace")
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _normalise_size(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"size must be a string, one of: {', '.join(SIZES)}")
        return normalise_size(value)

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_is_a_real_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("scale must be a number between 0 and 1")
        if not math.isfinite(value):
            raise ValueError("scale must be a finite number between 0 and 1")
        return value

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return size_dimensions(self.size)

    def to_upstream(self) -> dict[str, Any]:
        """The JSON body upstream expects (size under the ``width×height`` key)."""
        return self.model_dump(mode="json", by_alias=True)
