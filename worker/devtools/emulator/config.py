"""Configuration of the RunComfy emulator; every field can also be changed at runtime."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.devtools.emulator.faults import FaultRule, validate_rates
from worker.devtools.emulator.png import MAX_CHUNK_LENGTH
from worker.settings import DEFAULT_MODEL_ID


class EmulatorConfig(BaseModel):
    """How the emulator behaves: auth, timing, outputs and faults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str | None = Field(
        default=None, description="The only Bearer token accepted; None accepts any non-empty one."
    )
    model_ids: tuple[str, ...] = Field(
        default=(DEFAULT_MODEL_ID,), min_length=1, description="Model ids that exist (else 404)."
    )
    queue_s: float = Field(default=0.5, ge=0, description="Minimum time a request is in_queue.")
    queue_extra_s: float = Field(
        default=0.0,
        ge=0,
        description="Mean of an exponential wait added to each request's queue_s (seeded by "
        "seed): other customers' requests ahead in upstream's shared queue. Requests then "
        "start in the order their waits end. 0: every request waits exactly queue_s.",
    )
    run_s: float = Field(default=3.0, ge=0, description="Time a request is in_progress.")
    run_sigma: float = Field(
        default=0.0,
        ge=0,
        le=3,
        description="Spread of run times: each request runs run_s × exp(run_sigma × N(0,1)) "
        "(lognormal, median run_s; seeded by seed). 0: exactly run_s.",
    )
    capacity: int = Field(default=4, ge=1, description="Requests in_progress at once; rest queue.")
    images_per_set: int = Field(default=2, ge=1, le=4, description="Images when not force_single.")
    video: bool = Field(default=False, description="Also return video/videos (fake MP4).")
    output_min_bytes: int = Field(
        default=0, ge=0, le=MAX_CHUNK_LENGTH - 2**20, description="Pad each output file to this."
    )
    seed: int | None = Field(default=0, description="Seed of the fault-rate RNG.")
    faults: list[FaultRule] = Field(default_factory=list, description="Scripted fault rules.")
    fault_rates: dict[str, float] = Field(
        default_factory=dict, description="Probability per call of KIND or KIND@ENDPOINT."
    )
    retry_after_s: float = Field(
        default=1.0, ge=0, description="Retry-After of 429 faults and of concurrency-limit 429s."
    )
    slow_s: float = Field(default=5.0, ge=0, description="Delay of random slow answers.")
    public_base_url: str | None = Field(
        default=None, description="Base of URLs in answers; default: the address served on."
    )
    # -- account protection (all off by default) --
    max_concurrent: int | None = Field(
        default=None,
        ge=1,
        description="Requests one token may have in_queue/in_progress; a submit over it is "
        "answered 429 with Retry-After = retry_after_s. None: no limit.",
    )
    max_submits_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Accepted submits per second per token (token bucket); over it: 429 with "
        "Retry-After = time until the next is allowed. None: no limit.",
    )
    submit_burst: float | None = Field(
        default=None,
        ge=1,
        description="Size of that token bucket (submits allowed at once); "
        "default max(1, max_submits_per_s).",
    )
    balance: float | None = Field(
        default=None,
        description="Account balance at start (and after reset); each accepted submit costs "
        "cost_per_request; too little: error 400002. None: unlimited.",
    )
    cost_per_request: float = Field(default=1.0, ge=0, description="What one submit costs.")
    account_errors_as_200: bool = Field(
        default=False,
        description="Answer the 400002 body with HTTP 200 instead of 400.",
    )
    request_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds after a request reaches a final state (completed, failed, "
        "cancelled) before its id expires (404, error_code 404001); set at submit. None: never.",
    )

    @field_validator("balance", "cost_per_request", "max_submits_per_s", "submit_burst")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("fault_rates")
    @classmethod
    def _rates_valid(cls, value: dict[str, float]) -> dict[str, float]:
        return validate_rates(value)

    @field_validator("public_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    def updated(self, **changes: Any) -> EmulatorConfig:
        """A validated copy with ``changes`` applied (unknown names raise ValidationError)."""
        return EmulatorConfig.model_validate({**self.model_dump(), **changes})

    def public_dump(self) -> dict[str, Any]:
        """As JSON, with the token masked (the admin API is unauthenticated)."""
        data = self.model_dump(mode="json")
        if data["token"] is not None:
            data["token"] = "***"  # noqa: S105 - a mask, not a password
        return data
