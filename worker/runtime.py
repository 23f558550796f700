"""Per-process container of settings and clients (Redis, RunComfy, S3, HTTP), built when a
worker process starts (or a producer needs it), closed at shutdown. No import-time globals."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import redis

from worker.jobs.admission import RedisAdmission
from worker.jobs.runtimes import RedisRuntimes
from worker.jobs.store import JobStore, RedisJobStore
from worker.services.redis_client import make_redis
from worker.services.runcomfy import RunComfyClient
from worker.services.url_guard import UrlGuard, guarded_client
from worker.services.webhooks import WebhookSender
from worker.settings import Settings


@dataclass
class Runtime:
    """Everything a task needs, built once per process. Attributes are created lazily on first
    use, so a producer that only reads records never opens an S3 or RunComfy client."""

    settings: Settings
    redis_client: redis.Redis | None = None
    pid: int = field(default_factory=os.getpid)
    #: see StepContext.unrecorded: shared by every task of this process
    unrecorded_submits: dict[str, str] = field(default_factory=dict)

    @cached_property
    def redis(self) -> redis.Redis:
        """Redis client for the job store."""
        return self.redis_client or make_redis(self.settings.redis)

    @cached_property
    def store(self) -> JobStore:
        """The job store."""
        return RedisJobStore(
            self.redis,
            ttl_s=self.settings.job.ttl_s,
            deadline_s=self.settings.job.deadline_s,
            submit_grace_s=self.settings.submit.grace_s,
        )

    @cached_property
    def runtimes(self) -> RedisRuntimes:
        """Learned run times per kind (the status schedule's input)."""
        poll = self.settings.poll
        return RedisRuntimes(
            self.redis, window=poll.learn_window, min_samples=poll.learn_min_samples
        )

    @cached_property
    def runcomfy(self) -> RunComfyClient:
        """RunComfy client (operator's endpoint: not behind the SSRF guard)."""
        return RunComfyClient(self.settings.runcomfy)

    @cached_property
    def admission(self) -> RedisAdmission:
        """Fleet-wide caps, rate, 429 cooldown and account circuit (in Redis)."""
        rc = self.settings.runcomfy
        return RedisAdmission(
            self.redis,
            max_concurrency=rc.max_concurrency,
            tenant_max_concurrency=self.settings.tenant.max_concurrency,
            max_submits_per_s=rc.max_submits_per_s,
            probe_interval_s=rc.account_probe_s,
        )

    @property
    def upstream(self) -> RunComfyClient:
        """RunComfy, under the name the steps use (``worker.jobs.steps.Services``)."""
        return self.runcomfy

    @cached_property
    def guard(self) -> UrlGuard:
        """SSRF guard for producer-supplied URLs (webhook targets)."""
        return UrlGuard(allow_private=self.settings.allow_private_networks)

    @cached_property
    def download_guard(self) -> UrlGuard:
        """SSRF guard for upstream-supplied output URLs: the RunComfy host is always allowed."""
        host = urlsplit(self.settings.runcomfy.base_url).hostname or ""
        return UrlGuard(
            allow_private=self.settings.allow_private_networks,
            always_allowed_hosts=[host] if host else [],
        )

    @cached_property
    def downloads(self) -> httpx.Client:
        """HTTP client for output files, behind the guard."""
        rc = self.settings.runcomfy
        timeout = httpx.Timeout(rc.download_timeout_s, connect=rc.connect_timeout_s)
        return guarded_client(self.download_guard, timeout=timeout)

    @cached_property
    def archiver(self) -> Archiver:
        """Streams outputs into S3."""
        # boto3 costs ~0.3 s to import: only processes that archive pay it.
        from worker.services.s3 import Archiver, make_s3_client  # noqa: PLC0415

        return Archiver(make_s3_client(self.settings.s3), self.settings.s3, self.downloads)

    @cached_property
    def webhook_http(self) -> httpx.Client:
        """HTTP client for webhook deliveries, behind the guard."""
        timeout = httpx.Timeout(self.settings.webhook.timeout_s)
        return guarded_client(self.guard, timeout=timeout)

    @cached_property
    def webhooks(self) -> WebhookSender:
        """Signs and POSTs webhook events."""
        return WebhookSender(self.settings.webhook.secret, self.webhook_http)

    def build_all(self) -> None:
        """Build every client now (a worker at start), so a bad setting shows at once
        instead of at the first task that needs the client."""
        for name in ("store", "runcomfy", "archiver", "webhooks"):
            getattr(self, name)

    def close(self) -> None:
        """Close every client that was opened."""
        opened = self.__dict__
        if "runcomfy" in opened:
            self.runcomfy.close()
        for name in ("downloads", "webhook_http"):
            if name in opened:
                opened[name].close()
        if "redis" in opened and self.redis_client is None:
            self.redis.close()


if TYPE_CHECKING:  # boto3 stays out of processes that never archive
    from worker.services.s3 import Archiver
