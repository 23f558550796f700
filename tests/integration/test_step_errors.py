"""A step that keeps raising an unexpected exception is retried with backoff, then fails its
job with internal_error: never a silent ack. A real Celery worker (in a thread) on a real
Redis; the step is replaced by one that raises."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from api_contracts.jobs import JobRequest, JobStatus
from api_contracts.messages import TASK_POLL
from worker.devtools.embedded import EmbeddedRedis
from worker.jobs import decisions
from worker.jobs.state import JobChange
from worker.queueing import tasks
from worker.queueing.config import ServiceCelery
from worker.queueing.publish import send_message
from worker.queueing.run import create_app
from worker.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def app(redis_server: EmbeddedRedis) -> Iterator[ServiceCelery]:
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "t",
        "WEBHOOK_SECRET": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
        "RECONCILE_INTERVAL_S": "3600",
    }
    app = create_app(load_settings(environ=env))
    app.runtime.redis.flushdb()
    yield app
    app.close_runtime()


def test_a_step_that_keeps_raising_fails_its_job_with_internal_error(
    app: ServiceCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def broken_poll(*_: Any) -> Any:
        calls.append("poll")
        raise KeyError("a bug")

    monkeypatch.setitem(tasks.TASKS, TASK_POLL, broken_poll)
    monkeypatch.setattr(tasks, "MAX_STEP_RETRIES", 2)
    monkeypatch.setattr(decisions, "backoff", lambda *_a, **_k: 0.1)
    store = app.runtime.store
    job, _ = store.create_if_absent("boom1", JobRequest.model_validate({"input": {"prompt": "x"}}))
    for status in (JobStatus.SUBMITTING, JobStatus.IN_QUEUE):
        job = store.update(job, JobChange(status=status, request_id="rid", seq=1)) or job

    with start_worker(app, perform_ping_check=False, loglevel="CRITICAL", shutdown_timeout=10):
        send_message(app, TASK_POLL, ["boom1", 1])
        deadline = time.monotonic() + 20
        while store.load("boom1").status != JobStatus.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)

    final = store.load("boom1")
    assert final.status == JobStatus.FAILED
    assert final.record.error is not None
    assert final.record.error.code == "internal_error"
    assert "KeyError" in final.record.error.message
    assert len(calls) == 3  # the first run and two retries
