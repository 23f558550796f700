"""Service settings: parsed once from the environment, then passed in. Nested per outside system.

The environment names are a contract with operators (see ``.env.example``):
``REDIS_URL``, ``RUNCOMFY_*``, ``S3_*``, ``WEBHOOK_*``, ``POLL_*``, ``JOB_*``, ``BROKER_*``,
``ALLOW_PRIVATE_NETWORKS``, ``WORKER_*``. AWS credentials and region come from boto3's own
chain (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance roles …), never from here.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from worker.errors import ConfigError

DEFAULT_RUNCOMFY_BASE_URL = "https://model-api.runcomfy.net"
DEFAULT_MODEL_ID = "bytedance/dreamina-4-0/text-to-image"
# Standard Webhooks' suggested schedule (as Svix does): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# The variables load_settings is reading, while it reads them. A context variable, not a global,
# so that concurrent loads in other threads (or tasks) each see their own.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("_ENVIRON", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        # Set first: super().__init__ loads the variables, through _load_env_vars.
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class _Section(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)
    env_prefix_name: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The default sources, with the environment read from load_settings' mapping if set."""
        environ = _ENVIRON.get()
        if environ is not None:
            env_settings = _MappingEnvSource(settings_cls, environ)
        return init_settings, env_settings, dotenv_settings, file_secret_settings


class RedisSettings(_Section):
    """Redis: the Celery broker and the job store (one server, or a Sentinel group)."""

    model_config = SettingsConfigDict(env_prefix="REDIS_")
    env_prefix_name: ClassVar[str] = "REDIS_"

    url: str = Field(
        default="redis://localhost:6379/0",
        description="Broker and job store: redis://, rediss://, unix://, or "
        "sentinel://host1:26379;sentinel://host2:26379 with REDIS_SENTINEL_MASTER.",
    )
    sentinel_master: str | None = Field(
        default=None, description="The Sentinel master group name (sentinel:// URLs)."
    )
    sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the Sentinel nodes themselves."
    )
    password: SecretStr | None = Field(
        default=None, description="Password of the Redis master (and replicas) behind Sentinel."
    )
    tls: bool = Field(default=False, description="TLS to the Sentinel-managed Redis servers.")

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value.startswith("sentinel://"):
            parts = [p for p in value.split(";") if p.strip()]
            if not all(p.strip().startswith("sentinel://") for p in parts):
                raise ValueError("every ;-separated part must be a sentinel:// URL")
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")
        return value

    @field_validator("sentinel_master", "sentinel_password", "password", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _sentinel_needs_master(self) -> RedisSettings:
        if self.is_sentinel and not self.sentinel_master:
            raise ValueError("REDIS_SENTINEL_MASTER is required with a sentinel:// REDIS_URL")
        return self

    @property
    def is_sentinel(self) -> bool:
        """Is REDIS_URL a Sentinel group?"""
        return self.url.startswith("sentinel://")


class RunComfySettings(_Section):
    """The RunComfy Model API (or the bundled emulator)."""

    model_config = SettingsConfigDict(env_prefix="RUNCOMFY_")
    env_prefix_name: ClassVar[str] = "RUNCOMFY_"

    base_url: str = DEFAULT_RUNCOMFY_BASE_URL
    api_token: SecretStr | None = None
    model_id: str = DEFAULT_MODEL_ID
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    download_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Total seconds one output file may take to download (per-read timeout too).",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Most jobs in RunComfy at once across the fleet (unset: no limit).",
    )
    max_submits_per_s: float | None = Field(
        default=None, gt=0, description="Fleet-wide submits per second (unset: no limit)."
    )
    account_probe_s: float = Field(
        default=60.0,
        gt=0,
        description="After an account error pauses submissions, try one job again this often.",
    )

    @field_validator("max_concurrency", "max_submits_per_s", mode="before")
    @classmethod
    def _unset_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("model_id")
    @classmethod
    def _model_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value or " " in value:
            raise ValueError("must look like owner/model/task")
        return value

    @property
    def call_budget_s(self) -> float:
        """The longest one API call can take: pool + connect, then write + read timeouts."""
        return 2 * self.connect_timeout_s + 2 * self.read_timeout_s


class S3Settings(_Section):
    """Where outputs are archived. Any S3 endpoint: AWS, MinIO, R2, moto …"""

    model_config = SettingsConfigDict(env_prefix="S3_")
    env_prefix_name: ClassVar[str] = "S3_"

    bucket: str = "runcomfy-outputs"
    prefix: str = Field(default="runcomfy/", description="Key prefix; keys are <prefix><job>/<i>.")
    endpoint_url: str | None = None
    region: str | None = Field(default=None, description="Overrides AWS_REGION for this client.")
    presign_ttl_s: int = Field(default=7 * 24 * 3600, ge=1, le=7 * 24 * 3600)
    part_size_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    retry_window_s: float = Field(default=900.0, ge=0, description="How long S3 errors retry.")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not (3 <= len(value) <= 63) or not all(
            c.islower() or c.isdigit() or c in ".-" for c in value
        ):
            raise ValueError("must be a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        return value

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None


class WebhookSettings(_Section):
    """Signing and delivering webhooks (Standard Webhooks)."""

    model_config = SettingsConfigDict(env_prefix="WEBHOOK_")
    env_prefix_name: ClassVar[str] = "WEBHOOK_"

    secret: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="whsec_… secrets, comma-separated; first signs, all sign."
    )
    retry_schedule: Annotated[tuple[float, ...], NoDecode] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("secret", mode="before")
    @classmethod
    def _split_secrets(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, secret in enumerate(value):
            raw = secret.get_secret_value()
            body = raw.removeprefix("whsec_")
            try:
                if not base64.b64decode(body, validate=True):
                    raise ValueError
            except (binascii.Error, ValueError):
                raise ValueError(f"secret #{i + 1} is not whsec_<base64>") from None
        return value

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("retry_schedule")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError("delays must be >= 0 seconds")
        return value


class PollSettings(_Section):
    """The adaptive status-check schedule."""

    model_config = SettingsConfigDict(env_prefix="POLL_")
    env_prefix_name: ClassVar[str] = "POLL_"

    initial_delay_s: float = Field(default=1.0, ge=0)
    min_interval_s: float = Field(default=1.0, gt=0)
    max_interval_s: float = Field(default=30.0, gt=0)
    learn: bool = Field(
        default=True,
        description="Schedule checks around the run times learned from earlier jobs of the "
        "same model, size and force_single (false: always the 10 % rule).",
    )
    learn_min_samples: int = Field(
        default=50, ge=1, description="Finished jobs of a kind before its run times are used."
    )
    learn_window: int = Field(
        default=500,
        ge=10,
        description="Samples per window of the run-time sketch; the last 1-2 windows count.",
    )
    learn_quantile: float = Field(
        default=0.06,
        gt=0,
        lt=0.5,
        description="The learned schedule's first check comes when this share of earlier "
        "jobs would have finished (the share it may detect later than the 10 % bound).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PollSettings:
        if self.max_interval_s < self.min_interval_s:
            raise ValueError("POLL_MAX_INTERVAL_S must be >= POLL_MIN_INTERVAL_S")
        return self


class JobSettings(_Section):
    """Job lifetime."""

    model_config = SettingsConfigDict(env_prefix="JOB_")
    env_prefix_name: ClassVar[str] = "JOB_"

    deadline_s: float = Field(default=1800.0, gt=0, description="Fail a job not done by then.")
    ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description="Keep final records this long.")


class ReconcileSettings(_Section):
    """The reconciler: the job store's own guarantee that every job moves on."""

    model_config = SettingsConfigDict(env_prefix="RECONCILE_")
    env_prefix_name: ClassVar[str] = "RECONCILE_"

    interval_s: float = Field(
        default=15.0, gt=0, description="How often one worker fleet-wide sweeps overdue jobs."
    )
    batch: int = Field(default=500, ge=1, description="Most overdue jobs handled per pass.")
    wake_s: float = Field(
        default=0.5,
        gt=0,
        description="How often one worker fleet-wide sends the parked waits that are due "
        "(long status-check intervals, webhook retries): how late they may run.",
    )
    grace_s: float = Field(
        default=15.0,
        gt=0,
        description="How long past its due time a promised message may be missing before "
        "it is sent again.",
    )


class SubmitSettings(_Section):
    """Submitting to upstream."""

    model_config = SettingsConfigDict(env_prefix="SUBMIT_")
    env_prefix_name: ClassVar[str] = "SUBMIT_"

    grace_s: float = Field(
        default=300.0,
        gt=0,
        description="A queued job not picked up by then gets its submit message again.",
    )
    ambiguous: Literal["resubmit", "fail"] = Field(
        default="resubmit",
        description="After a submit timed out having sent the request (maybe accepted and "
        "billed): submit again, or fail the job (submit_ambiguous).",
    )


class TenantSettings(_Section):
    """Fair shares across tenants."""

    model_config = SettingsConfigDict(env_prefix="TENANT_")
    env_prefix_name: ClassVar[str] = "TENANT_"

    max_concurrency: int | None = Field(
        default=None, ge=1, description="Most jobs of one tenant in RunComfy at once."
    )

    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _unset_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class BrokerSettings(_Section):
    """Celery-on-Redis broker tuning."""

    model_config = SettingsConfigDict(env_prefix="BROKER_")
    env_prefix_name: ClassVar[str] = "BROKER_"

    visibility_timeout_s: int = Field(default=3600, ge=10)
    restore_sweep_s: float = Field(
        default=100.0, ge=1, description="How often unacked messages past the timeout are swept."
    )


class WorkerSettings(_Section):
    """Worker process behaviour."""

    model_config = SettingsConfigDict(env_prefix="WORKER_")
    env_prefix_name: ClassVar[str] = "WORKER_"

    eta_task_limit: int = Field(default=20000, ge=1, description="Held countdowns per process.")
    soft_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    send_task_events: bool = False
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics.")
    heartbeat_file: str | None = None
    log_json: bool = True
    log_level: str = "INFO"


class _TopLevel(_Section):
    allow_private_networks: bool = False
    allow_redis_eviction: bool = False


_SECTIONS: dict[str, type[_Section]] = {
    "redis": RedisSettings,
    "runcomfy": RunComfySettings,
    "s3": S3Settings,
    "webhook": WebhookSettings,
    "poll": PollSettings,
    "job": JobSettings,
    "reconcile": ReconcileSettings,
    "submit": SubmitSettings,
    "tenant": TenantSettings,
    "broker": BrokerSettings,
    "worker": WorkerSettings,
}


class Settings(BaseModel):
    """All settings, one object. Build with :func:`load_settings` (env) or directly (tests)."""

    model_config = {"frozen": True}

    redis: RedisSettings = Field(default_factory=RedisSettings)
    runcomfy: RunComfySettings = Field(default_factory=RunComfySettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    job: JobSettings = Field(default_factory=JobSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    submit: SubmitSettings = Field(default_factory=SubmitSettings)
    tenant: TenantSettings = Field(default_factory=TenantSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    allow_private_networks: bool = False
    allow_redis_eviction: bool = False

    @property
    def max_countdown_s(self) -> float:
        """The longest single countdown: far below the visibility timeout (longer waits hop)."""
        return max(1.0, min(600.0, self.broker.visibility_timeout_s / 4))


def _env_name(section: type[_Section], loc: tuple[int | str, ...]) -> str:
    if not loc:  # a rule across fields: its message names them
        return f"{section.env_prefix_name}*"
    return f"{section.env_prefix_name}{loc[0]}".upper()


def load_settings(*, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read every section from the environment; a bad value raises ConfigError naming it.

    ``environ``: read these variables instead of this process's (what a worker started with
    that environment would see: the demo, tests and benchmarks use it). ``os.environ`` is
    only ever read, never changed, so other threads (boto3 …) are unaffected."""
    # One snapshot, so that every section sees the same variables.
    token = _ENVIRON.set(dict(os.environ if environ is None else environ))
    try:
        return _load(overrides)
    finally:
        _ENVIRON.reset(token)


def _load(overrides: Mapping[str, Any]) -> Settings:
    built: dict[str, Any] = {}
    problems: list[str] = []
    for name, cls in _SECTIONS.items():
        try:
            built[name] = cls(**overrides.get(name, {}))
        except ValidationError as exc:
            for err in exc.errors():
                problems.append(f"{_env_name(cls, err['loc'])}: {err['msg']}")
    try:
        top = _TopLevel()
    except ValidationError as exc:
        problems.extend(f"{_env_name(_TopLevel, e['loc'])}: {e['msg']}" for e in exc.errors())
    else:
        built["allow_redis_eviction"] = overrides.get(
            "allow_redis_eviction", top.allow_redis_eviction
        )
        built["allow_private_networks"] = overrides.get(
            "allow_private_networks", top.allow_private_networks
        )
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return Settings(**built)
