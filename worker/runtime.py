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

from worker.settings import Settings
from worker.store import JobStore


def make_redis(url: str) -> redis.Redis:
    """A pooled, thread-safe Redis client with timeouts and health checks."""
    return redis.Redis.from_url(
        url,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )


@dataclass
class Runtime:
    """Everything a task needs, built once per process. Attributes are created lazily on first
    use, so a producer that only reads records never opens an S3 or RunComfy client."""

    settings: Settings
    redis_client: redis.Redis | None = None
    pid: int = field(default_factory=os.getpid)

    @cached_property
    def redis(self) -> redis.Redis:
        """Redis client for the job store."""
        return self.redis_client or make_redis(self.settings.redis.url)

    @cached_property
    def store(self) -> JobStore:
        """The job store."""
        return JobStore(self.redis, ttl_s=self.settings.job.ttl_s)

    @cached_property
    def runcomfy(self) -> RunComfyClient:
        """RunComfy client (operator's endpoint: not behind the SSRF guard)."""
        from worker.runcomfy import RunComfyClient

        return RunComfyClient(self.settings.runcomfy)

    @cached_property
    def guard(self) -> UrlGuard:
        """SSRF guard for producer-supplied URLs (webhook targets)."""
        from worker.ssrf import UrlGuard

        return UrlGuard(allow_private=self.settings.allow_private_networks)

    @cached_property
    def download_guard(self) -> UrlGuard:
        """SSRF guard for upstream-supplied output URLs: the RunComfy host is always allowed."""
        from worker.ssrf import UrlGuard

        host = urlsplit(self.settings.runcomfy.base_url).hostname or ""
        return UrlGuard(
            allow_private=self.settings.allow_private_networks,
            always_allowed_hosts=[host] if host else [],
        )

    @cached_property
    def downloads(self) -> httpx.Client:
        """HTTP client for output files, behind the guard."""
        from worker.ssrf import guarded_client

        rc = self.settings.runcomfy
        timeout = httpx.Timeout(rc.download_timeout_s, connect=rc.connect_timeout_s)
        return guarded_client(self.download_guard, timeout=timeout)

    @cached_property
    def archiver(self) -> Archiver:
        """Streams outputs into S3."""
        from worker.archive import Archiver, make_s3_client

        return Archiver(make_s3_client(self.settings.s3), self.settings.s3, self.downloads)

    @cached_property
    def webhook_http(self) -> httpx.Client:
        """HTTP client for webhook deliveries, behind the guard."""
        from worker.ssrf import guarded_client

        timeout = httpx.Timeout(self.settings.webhook.timeout_s)
        return guarded_client(self.guard, timeout=timeout)

    @cached_property
    def webhooks(self) -> WebhookSender:
        """Signs and POSTs webhook events."""
        from worker.webhooks import WebhookSender

        return WebhookSender(self.settings.webhook.secret, self.webhook_http)

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


if TYPE_CHECKING:  # keeps heavy imports out of producers that never use them
    from worker.archive import Archiver
    from worker.runcomfy import RunComfyClient
    from worker.ssrf import UrlGuard
    from worker.webhooks import WebhookSender
