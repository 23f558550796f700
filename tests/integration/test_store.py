"""The job store contract, on a real Redis and on the in-memory twin: creation,
compare-and-set, typed changes, TTLs, idempotency; events and keys on Redis."""

from __future__ import annotations

import threading

import pytest
import redis

from api_contracts.jobs import JobError, JobRequest, JobStatus
from worker.constants import INFLIGHT_KEY
from worker.errors import IdempotencyConflictError, JobNotFoundError, TransitionRefusedError
from worker.jobs.memory import InMemoryJobStore
from worker.jobs.state import JobChange, Lease, Outbox
from worker.jobs.store import JobStore, RedisJobStore, events_channel, job_key

pytestmark = pytest.mark.integration


def req(prompt: str = "a cat", **kw: object) -> JobRequest:
    return JobRequest.model_validate({"input": {"prompt": prompt}, **kw})


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return InMemoryJobStore(ttl_s=120)
    return RedisJobStore(request.getfixturevalue("redis_client"), ttl_s=120)


@pytest.fixture
def redis_store(redis_client: redis.Redis) -> RedisJobStore:
    return RedisJobStore(redis_client, ttl_s=120)


def test_create_if_absent_once(store: JobStore) -> None:
    job, created = store.create_if_absent("j1", req(webhook_url="https://example.com/h"))
    assert created and job.status == JobStatus.QUEUED and job.version == 1 and job.seq == 0
    assert job.record.webhook is not None and job.record.webhook.id == "msg_j1"
    again, created_again = store.create_if_absent("j1", req("something else"))
    assert not created_again
    assert again.record.request == job.record.request
    assert store.in_flight() == 1
    if isinstance(store, RedisJobStore):
        assert store.redis.ttl(job_key("j1")) == -1  # no TTL while in flight
    else:
        assert isinstance(store, InMemoryJobStore)
        assert "j1" not in store.ttls


def test_load_unknown(store: JobStore) -> None:
    assert store.get("nope") is None
    with pytest.raises(JobNotFoundError, match="nope"):
        store.load("nope")


def test_start_run_reads_the_job_and_counts_the_runs_of_a_step(store: JobStore) -> None:
    job, _ = store.create_if_absent("j9", req())
    first = store.start_run("j9", "runcomfy.archive")
    assert first is not None and first.runs == 1
    assert (first.record, first.version, first.seq) == (job.record, job.version, job.seq)
    assert first.read_at > 0
    # Writes keep the count; other steps and plain reads have their own (none).
    moved = store.update(first, JobChange(status=JobStatus.SUBMITTING))
    assert moved is not None
    second = store.start_run("j9", "runcomfy.archive")
    assert second is not None and second.runs == 2 and second.version == moved.version
    other = store.start_run("j9", "runcomfy.notify")
    assert other is not None and other.runs == 1
    plain = store.get("j9")
    assert plain is not None and plain.runs == 0
    # An unknown job is not counted into existence.
    assert store.start_run("nope", "runcomfy.archive") is None
    assert store.get("nope") is None
    if isinstance(store, RedisJobStore):
        assert not store.redis.exists(job_key("nope"))


def test_cas_applies_once_and_refuses_stale_versions(store: JobStore) -> None:
    job, _ = store.create_if_absent("j2", req())
    moved = store.update(job, JobChange(status=JobStatus.SUBMITTING, lease=Lease("task-1", 123.5)))
    assert moved is not None and moved.version == 2
    assert moved.lease == Lease("task-1", 123.5)
    assert store.update(job, JobChange(status=JobStatus.SUBMITTING)) is None  # stale read
    loaded = store.load("j2")
    assert loaded.status == JobStatus.SUBMITTING and loaded.version == 2
    assert loaded.lease == Lease("task-1", 123.5)
    released = store.update(loaded, JobChange(lease=None))
    assert released is not None and store.load("j2").lease is None


def test_unchanged_fields_keep_their_values_and_none_clears(store: JobStore) -> None:
    job, _ = store.create_if_absent("j2b", req())
    first = store.update(
        job, JobChange(status=JobStatus.SUBMITTING, attempt=3, since=5.0, notes=["n1"])
    )
    assert first is not None
    second = store.update(first, JobChange(status=JobStatus.IN_QUEUE, queue_position=4))
    assert second is not None
    loaded = store.load("j2b")
    assert (loaded.attempt, loaded.since, loaded.record.notes) == (3, 5.0, ["n1"])
    assert loaded.record.queue_position == 4
    third = store.update(loaded, JobChange(queue_position=None))
    assert third is not None and store.load("j2b").record.queue_position is None


def test_a_misspelt_change_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(TypeError):
        JobChange(queue_postion=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        JobChange().but(queue_postion=3)


def test_refused_transition_is_not_applied(store: JobStore) -> None:
    job, _ = store.create_if_absent("j3", req())
    with pytest.raises(TransitionRefusedError):
        store.update(job, JobChange(status=JobStatus.SUCCEEDED))
    assert store.load("j3").status == JobStatus.QUEUED


def test_terminal_sets_ttl_and_leaves_inflight(redis_store: RedisJobStore) -> None:
    store = redis_store
    job, _ = store.create_if_absent("j4", req())
    assert store.in_flight() == 1
    done = store.update(
        job,
        JobChange(
            status=JobStatus.FAILED, error=JobError(code="x", message="y"), seq=1, outbox=None
        ),
    )
    assert done is not None
    assert done.record.finished_at is not None
    assert 0 < store.redis.ttl(job_key("j4")) <= 120
    assert store.redis.zscore(INFLIGHT_KEY, "j4") is None
    assert store.in_flight() == 0


def test_memory_twin_tracks_ttls_and_in_flight_like_redis() -> None:
    store = InMemoryJobStore(ttl_s=120)
    job, _ = store.create_if_absent("j4m", req())
    assert store.in_flight() == 1 and "j4m" not in store.ttls
    done = store.update(job, JobChange(status=JobStatus.CANCELLED))
    assert done is not None and done.record.finished_at is not None
    assert store.ttls["j4m"] == 120 and store.in_flight() == 0
    assert store.events == [("j4m", "queued"), ("j4m", "cancelled")]


def test_outbox_and_seq_round_trip(store: JobStore) -> None:
    job, _ = store.create_if_absent("j5", req())
    after = store.update(
        job, JobChange(seq=1, outbox=Outbox(task="runcomfy.poll", seq=1, due_at=10.0))
    )
    assert after is not None
    loaded = store.load("j5")
    assert loaded.seq == 1
    assert loaded.outbox == Outbox(task="runcomfy.poll", seq=1, due_at=10.0)


def test_concurrent_cas_only_one_wins(store: JobStore) -> None:
    job, _ = store.create_if_absent("j6", req())
    results: list[object] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        change = JobChange(status=JobStatus.SUBMITTING, lease=Lease(f"t{i}", 1.0))
        results.append(store.update(job, change))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert store.load("j6").version == 2


def test_idempotency_same_request_same_job(store: JobStore) -> None:
    r = req(idempotency_key="order-1")
    assert store.claim_idempotency_key("order-1", "a", r) == "a"
    store.create_if_absent("a", r)
    assert store.claim_idempotency_key("order-1", "b", r) == "a"


def test_idempotency_different_request_refused(store: JobStore) -> None:
    r = req(idempotency_key="order-2")
    store.claim_idempotency_key("order-2", "a", r)
    store.create_if_absent("a", r)
    with pytest.raises(IdempotencyConflictError, match="order-2"):
        store.claim_idempotency_key("order-2", "b", req("other", idempotency_key="order-2"))


def test_changes_are_published(redis_store: RedisJobStore) -> None:
    store = redis_store
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(events_channel("j7"))
    job, _ = store.create_if_absent("j7", req())
    store.update(job, JobChange(status=JobStatus.SUBMITTING))
    got = []
    for _ in range(50):
        message = pubsub.get_message(timeout=0.1)
        if message:
            got.append(message["data"])
        if len(got) == 2:
            break
    pubsub.close()
    assert got == [b"queued", b"submitting"]
