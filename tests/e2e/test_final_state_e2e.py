"""Every job reaches a final state, with real workers: the job store's reconciler recovers
what the broker lost (deleted messages, records without a submit message, a killed
worker's held countdowns long before the visibility timeout), and upstream going backwards
never strands a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import pytest

from api_contracts.jobs import JobStatus
from api_contracts.messages import ALL_QUEUES
from worker.constants import DUE_KEY, INFLIGHT_KEY
from worker.devtools.emulator import EmulatorConfig, FaultRule

from .conftest import TOKEN, Stack, assert_clean_log

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    stack = stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.2, run_s=2.0, capacity=16, seed=11),
        # The broker would bring a killed worker's messages back only after an hour.
        BROKER_VISIBILITY_TIMEOUT_S="3600",
        RECONCILE_INTERVAL_S="0.5",
        RECONCILE_GRACE_S="1",
        SUBMIT_GRACE_S="1",
        POLL_MAX_INTERVAL_S="0.5",
    )
    stack.start_worker()
    return stack


def delete_messages(stack: Stack) -> int:
    """Delete every broker message, queued or unacked: what a failover, a FLUSH or a worker
    killed between BRPOP and its bookkeeping does to them."""
    deleted = sum(int(stack.redis.delete(queue)) for queue in ALL_QUEUES)
    deleted += int(stack.redis.hlen("unacked"))
    stack.redis.delete("unacked", "unacked_index")
    return deleted


@pytest.mark.timeout(120)
def test_a_killed_worker_and_deleted_messages_still_end_every_job(stack: Stack) -> None:
    submits_before = stack.emulator.counters()["submits"]
    jobs = [
        stack.producer.enqueue(
            {
                "input": {"prompt": f"lost {i}", "force_single": True},
                "webhook_url": stack.receiver.url,
            }
        ).id
        for i in range(8)
    ]
    for job_id in jobs:
        stack.wait(job_id, lambda r: r.status in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS))
    stack.workers[-1].kill()
    assert delete_messages(stack) >= 1, "the worker should have held countdown polls"
    started = time.monotonic()
    stack.start_worker()
    for job_id in jobs:
        record = stack.wait(job_id, timeout=60)
        assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
        stack.wait_webhook(job_id, timeout=30)
    # Minutes before the broker's visibility timeout (an hour) would have brought them back.
    assert time.monotonic() - started < 45
    assert {f"msg_{j}" for j in jobs} <= set(stack.receiver.events_by_id())
    assert stack.emulator.counters()["submits"] - submits_before == len(jobs)  # no resubmit
    assert stack.redis.zcard(INFLIGHT_KEY) == 0
    due = cast("list[bytes]", stack.redis.zrange(DUE_KEY, 0, -1))
    assert not {m.decode() for m in due} & set(jobs)
    assert_clean_log(stack)


@pytest.mark.timeout(60)
def test_a_record_whose_submit_message_was_never_sent_is_submitted(stack: Stack) -> None:
    from api_contracts.jobs import JobRequest

    # What a producer that died between creating the record and publishing leaves behind.
    request = JobRequest.model_validate({"input": {"prompt": "orphan record"}})
    job, created = stack.producer.rt.store.create_if_absent("orphan0000000001", request)
    assert created and job.status == JobStatus.QUEUED
    record = stack.wait(job.id, timeout=30)
    assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)


@pytest.mark.timeout(60)
def test_upstream_requeueing_a_started_request_keeps_the_job_polling(stack: Stack) -> None:
    job_id = stack.producer.enqueue({"input": {"prompt": "requeued", "force_single": True}}).id
    stack.wait(job_id, lambda r: r.status == JobStatus.IN_PROGRESS)
    stack.emulator.set_faults([FaultRule(kind="requeued", endpoint="status", times=3)])
    try:
        record = stack.wait(job_id, timeout=30)
    finally:
        stack.emulator.set_faults([])
    assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
    assert stack.emulator.counters()["faults"].get("requeued", 0) >= 1


@pytest.mark.timeout(60)
def test_a_submit_whose_worker_died_mid_post_is_resubmitted_once_its_lease_expires(
    stack: Stack,
) -> None:
    from api_contracts.jobs import JobRequest
    from worker.jobs.state import JobChange, Lease

    # A worker claimed the job, started its POST and died: a live lease, no message left.
    store = stack.producer.rt.store
    request = JobRequest.model_validate({"input": {"prompt": "died mid-post"}})
    job, _ = store.create_if_absent("midpost000000001", request)
    lease = Lease("dead-worker", store.now() + 3.0)
    claimed = store.update(job, JobChange(status=JobStatus.SUBMITTING, lease=lease, due_in=4.0))
    assert claimed is not None
    ambiguous_before = store.stats().get("ambiguous_submits", 0)

    time.sleep(2.0)  # the lease still holds: nobody submits twice meanwhile
    assert store.load("midpost000000001").status == JobStatus.SUBMITTING

    record = stack.wait("midpost000000001", timeout=30)
    assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
    assert any(n.startswith("ambiguous_submit") for n in record.notes)
    assert store.stats().get("ambiguous_submits", 0) == ambiguous_before + 1
