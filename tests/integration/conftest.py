"""Fixtures shared by the integration tests (the servers themselves live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.devtools.embedded import EmbeddedRedis
from worker.producer.producer import Producer
from worker.queueing.config import ServiceCelery
from worker.queueing.run import create_app
from worker.settings import RedisSettings, Settings


@pytest.fixture
def producer(redis_server: EmbeddedRedis) -> Iterator[Producer]:
    """A Producer on a flushed real Redis (and the Celery app it publishes through)."""
    app: ServiceCelery = create_app(Settings(redis=RedisSettings(url=redis_server.url)))
    app.runtime.redis.flushdb()
    yield Producer(app.runtime, app)
    app.close_runtime()
