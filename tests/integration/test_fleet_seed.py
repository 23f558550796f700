"""``bench.fleet.seed_jobs``: jobs in flight as a submit and a first check leave them, on a
real Redis, without a worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from api_contracts.jobs import JobStatus
from api_contracts.messages import TASK_POLL
from bench.fleet import seed_jobs
from worker.constants import DUE_KEY
from worker.devtools.embedded import EmbeddedRedis
from worker.devtools.emulator import Emulator, EmulatorConfig
from worker.jobs.store import RedisJobStore
from worker.settings import PollSettings, ReconcileSettings, RedisSettings, Settings


def _setup(server: EmbeddedRedis, interval_s: float) -> tuple[Settings, Emulator, RedisJobStore]:
    settings = Settings(
        redis=RedisSettings(url=server.url),
        poll=PollSettings(min_interval_s=interval_s, max_interval_s=interval_s),
        reconcile=ReconcileSettings(grace_s=15.0),
    )
    emulator = Emulator(EmulatorConfig(token="t", run_s=3600, capacity=4), "http://emu")
    store = RedisJobStore(redis.Redis.from_url(server.url), ttl_s=3600, deadline_s=4 * 3600.0)
    return settings, emulator, store


def _status(emulator: Emulator, request_id: str) -> str:
    reply = emulator.handle("GET", f"/v1/requests/{request_id}/status", "Bearer t", b"")
    assert reply.status == 200 and isinstance(reply.body, bytes)
    return str(json.loads(reply.body)["status"])


def test_seeded_jobs_run_upstream_with_their_next_checks_parked_evenly(
    redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    settings, emulator, store = _setup(redis_server, 120.0)
    published: list[Any] = []
    first_due = store.now() + 100.0
    ids = seed_jobs(
        redis_client,
        settings,
        emulator,
        lambda *message: published.append(message),
        jobs=25,
        first_due=first_due,
        span_s=50.0,
        run_s=3600.0,
        batch=10,
    )
    assert len(set(ids)) == 25
    assert not published  # every wait over a minute: parked, nothing sent
    assert store.in_flight() == 25
    for i, job_id in enumerate(ids):
        job = store.load(job_id)
        assert job.status == JobStatus.IN_PROGRESS
        assert job.lease is None and job.attempt == 0
        assert job.record.status_calls == 1 and job.record.submitted_at is not None
        assert job.started_ts == job.checked_ts > 0
        request_id = job.record.request_id
        assert request_id and _status(emulator, request_id) == "in_progress"
        # the poll step's hand-off: seq 2 (the submit's was 1), due evenly over the span
        assert job.outbox is not None and job.outbox.task == TASK_POLL
        assert job.outbox.seq == job.seq == 2
        assert job.outbox.due_at == pytest.approx(first_due + (i + 0.5) * 2.0)
        # parked: the wake pass sends it once its score is reached, exactly the planned time
        assert redis_client.zscore(DUE_KEY, job_id) == pytest.approx(job.outbox.due_at, abs=1e-5)


def test_short_waits_are_published_as_countdowns(
    redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    settings, emulator, store = _setup(redis_server, 15.0)
    published: list[tuple[str, list[Any], dict[str, Any], float]] = []

    def publish(task: str, args: list[Any], kwargs: dict[str, Any], countdown: float) -> None:
        published.append((task, args, kwargs, countdown))

    seeded_at = store.now()
    first_due = seeded_at + 5.0
    ids = seed_jobs(
        redis_client,
        settings,
        emulator,
        publish,
        jobs=4,
        first_due=first_due,
        span_s=8.0,
        run_s=3600.0,
    )
    assert [(task, args) for task, args, _, _ in published] == [
        (TASK_POLL, [job_id, 2]) for job_id in ids
    ]
    for (_, _, _, countdown), job_id in zip(published, ids, strict=True):
        job = store.load(job_id)
        assert job.outbox is not None
        assert countdown == pytest.approx(job.outbox.due_at - seeded_at, abs=0.5)
        # published: the due index holds it as overdue only after the grace
        score = redis_client.zscore(DUE_KEY, job_id)
        assert score == pytest.approx(job.outbox.due_at + 15.0, abs=0.5)
