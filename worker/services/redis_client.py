"""Connections to Redis, the broker and the job store: one server (``redis://``,
``rediss://``, ``unix://``) or a Sentinel group (``sentinel://h1:26379;sentinel://h2:26379``
with ``REDIS_SENTINEL_MASTER``).

Everything that talks to Redis gets its client here (the job store, pub/sub, the producer,
the CLI, the healthcheck, metrics) and Celery gets its broker URL and transport options
here, so a Sentinel deployment is one setting for all of them. A Sentinel-managed client
finds the current master on every (re)connect, so a failover looks like a short connection
error: retried by the tasks, invisible to the job store's compare-and-set protocol.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.sentinel import Sentinel

from worker.settings import RedisSettings

#: Client timeouts (seconds): long enough for a busy Redis, short enough to notice a dead one.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def sentinel_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) of every ``sentinel://`` part of ``url``."""
    parts = [urlsplit(p.strip()) for p in url.split(";") if p.strip()]
    return [(p.hostname or "127.0.0.1", p.port or 26379) for p in parts]


def _url_password(url: str) -> str | None:
    first = url.split(";", 1)[0].strip()
    return urlsplit(first).password or None


def _db(url: str) -> int:
    path = urlsplit(url.split(";", 1)[0].strip()).path.strip("/")
    return int(path) if path.isdigit() else 0


def master_password(settings: RedisSettings) -> str | None:
    """The master's password: REDIS_PASSWORD, else one in the (first) sentinel URL."""
    if settings.password is not None:
        return settings.password.get_secret_value()
    return _url_password(settings.url)


def make_redis(
    settings: RedisSettings,
    *,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> redis.Redis:
    """A pooled, thread-safe client of the Redis (or the Sentinel group's master)."""
    if not settings.is_sentinel:
        return redis.Redis.from_url(
            settings.url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=30,
            retry_on_timeout=True,
        )
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": connect_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    group = Sentinel(  # type: ignore[no-untyped-call]
        sentinel_nodes(settings.url),
        sentinel_kwargs=sentinel_kwargs,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        password=master_password(settings),
        ssl=settings.tls,
        db=_db(settings.url),
    )
    assert settings.sentinel_master is not None  # RedisSettings requires it with sentinel://
    master: redis.Redis = group.master_for(  # type: ignore[no-untyped-call]
        settings.sentinel_master,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    return master


def broker_url(settings: RedisSettings) -> str:
    """The URL Celery connects with (kombu reads the master password from its first part)."""
    if not settings.is_sentinel or settings.password is None or _url_password(settings.url):
        return settings.url
    secret = settings.password.get_secret_value()
    return ";".join(
        part.replace("sentinel://", f"sentinel://:{secret}@", 1)
        for part in settings.url.split(";")
        if part.strip()
    )


def broker_options(settings: RedisSettings) -> dict[str, Any]:
    """Transport options a Sentinel group adds (none for a single server)."""
    if not settings.is_sentinel:
        return {}
    options: dict[str, Any] = {"master_name": settings.sentinel_master}
    if settings.sentinel_password is not None:
        options["sentinel_kwargs"] = {"password": settings.sentinel_password.get_secret_value()}
    return options
