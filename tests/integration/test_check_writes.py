"""Check-only writes (``check.lua``) and learned run times (``learn.lua``) on a real Redis,
the write path alongside the in-memory twin."""

from __future__ import annotations

import pytest
import redis

from api_contracts.jobs import JobRequest, JobStatus
from worker.constants import DUE_KEY
from worker.jobs.memory import InMemoryJobStore
from worker.jobs.runtimes import RedisRuntimes, Samples, bucket_of, read, teach
from worker.jobs.state import JobChange, Outbox, StoredJob, is_check_only
from worker.jobs.store import JobStore, RedisJobStore, events_channel, job_key

pytestmark = pytest.mark.integration

REQ = JobRequest.model_validate({"input": {"prompt": "a cat"}})


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return InMemoryJobStore(ttl_s=120)
    return RedisJobStore(request.getfixturevalue("redis_client"), ttl_s=120)


def running(store: JobStore) -> StoredJob:
    created, _ = store.create_if_absent("j1", REQ)
    submitting = store.update(created, JobChange(status=JobStatus.SUBMITTING))
    assert submitting is not None
    job = store.update(submitting, JobChange(status=JobStatus.IN_PROGRESS, request_id="r1"))
    assert job is not None
    return store.load("j1")


def check(job: StoredJob, **marks: float) -> JobChange:
    return JobChange(
        status=job.status,
        status_calls=job.record.status_calls + 1,
        attempt=0,
        queue_position=job.record.queue_position,
        seq=job.seq + 1,
        outbox=Outbox("runcomfy.poll", job.seq + 1, job.read_at + 5),
        due_in=20.0,
        checked_ts=job.read_at,
        **marks,  # type: ignore[arg-type]
    )


def test_what_counts_as_check_only(store: JobStore) -> None:
    job = running(store)
    assert is_check_only(job, check(job))
    assert is_check_only(job, check(job, started_ts=5.0))
    assert not is_check_only(job, check(job).but(status=JobStatus.ARCHIVING))
    assert not is_check_only(job, check(job).but(queue_position=3))
    assert not is_check_only(job, check(job).but(attempt=1))
    assert not is_check_only(job, check(job).but(notes=["x"]))
    assert not is_check_only(job, JobChange(seq=job.seq + 1))  # no status call: not a check


def test_a_check_only_write_keeps_the_record_and_counts_the_call(store: JobStore) -> None:
    job = running(store)
    after = store.update(job, check(job, started_ts=job.read_at))
    assert after is not None
    again = store.load("j1")
    assert again.version == job.version + 1 and again.seq == job.seq + 1
    assert again.record.status_calls == 1 and again.record.updated_at == job.record.updated_at
    assert again.outbox == after.outbox and again.checked_ts == pytest.approx(job.read_at)
    assert again.started_ts == pytest.approx(job.read_at)
    # a second check, then a full write: the count carries over into the record
    after2 = store.update(again, check(again))
    assert after2 is not None and store.load("j1").record.status_calls == 2
    full = store.update(store.load("j1"), JobChange(status=JobStatus.ARCHIVING, status_calls=3))
    assert full is not None
    final = store.load("j1")
    assert final.record.status_calls == 3 and final.status == JobStatus.ARCHIVING
    assert final.started_ts == pytest.approx(job.read_at)  # marks survive full writes


def test_a_stale_check_only_write_is_refused(store: JobStore) -> None:
    job = running(store)
    assert store.update(job, check(job)) is not None
    assert store.update(job, check(job)) is None  # same version as read: stale now
    assert store.load("j1").record.status_calls == 1


def test_check_only_moves_the_due_index_and_publishes_nothing(
    redis_client: redis.Redis,
) -> None:
    store = RedisJobStore(redis_client, ttl_s=120, deadline_s=1800)
    job = running(store)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(events_channel("j1"))
    try:
        assert store.update(job, check(job)) is not None
        due = redis_client.zscore(DUE_KEY, "j1")
        assert due is not None and due == pytest.approx(store.now() + 20.0, abs=2.0)
        assert pubsub.get_message(timeout=0.2) is None
    finally:
        pubsub.close()
    fields = redis_client.hgetall(job_key("j1"))
    assert fields[b"calls"] == b"1"


def test_learned_run_times_turn_over_by_window(redis_client: redis.Redis) -> None:
    clock = [0.0]
    book = RedisRuntimes(redis_client, window=10, min_samples=10, clock=lambda: clock[0])
    assert book.sketch("m|1x1|set") is None
    for _ in range(10):
        book.learn("m|1x1|set", 5.0, early=False)
    assert book.sketch("m|1x1|set") is None  # cached (for a second while learning)
    clock[0] += 1.5
    assert book.sketch("m|1x1|set") is not None  # known now: cached for longer
    for _ in range(4):
        book.learn("m|1x1|set", 50.0, early=True)
    clock[0] += 5
    assert book.sketch("m|1x1|set").total == 10  # type: ignore[union-attr]
    clock[0] += 6
    sketch = book.sketch("m|1x1|set")
    assert sketch is not None and sketch.total == 14 and sketch.early == 4
    assert dict(sketch.counts) == {bucket_of(5.0): 10, bucket_of(50.0): 4}
    for _ in range(10):
        book.learn("m|1x1|set", 50.0, early=False)
    clock[0] += 11
    sketch = book.sketch("m|1x1|set")
    assert sketch is not None and dict(sketch.counts) == {bucket_of(50.0): 14}
    assert redis_client.ttl("rcw:runtimes:m|1x1|set:old") > 0


def test_a_kind_learns_its_total_and_run_times_apart(redis_client: redis.Redis) -> None:
    book = RedisRuntimes(redis_client, window=10)
    teach(book, "m|1x1|set", Samples(total_s=30.0, run_s=25.0))
    teach(book, "m|1x1|set", Samples(total_s=40.0, total_early=True))
    learned = read(book, "m|1x1|set")
    assert learned.total is not None and dict(learned.total.counts) == {
        bucket_of(30.0): 1,
        bucket_of(40.0): 1,
    }
    assert learned.total.early == 1
    assert learned.run is not None and dict(learned.run.counts) == {bucket_of(25.0): 1}
    assert redis_client.exists("rcw:runtimes:m|1x1|set:cur", "rcw:runtimes:m|1x1|set|run:cur") == 2
