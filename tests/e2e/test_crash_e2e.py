"""A worker SIGKILLed while it holds countdown polls: the jobs still finish on another."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from api_contracts.jobs import JobStatus
from worker.devtools.emulator import EmulatorConfig

from .conftest import TOKEN, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    return stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.2, run_s=5.0, capacity=16, seed=9),
        BROKER_VISIBILITY_TIMEOUT_S="10",
        BROKER_RESTORE_SWEEP_S="1",
        POLL_MAX_INTERVAL_S="2",
    )


@pytest.mark.timeout(120)
def test_sigkill_while_holding_polls_then_jobs_finish(stack: Stack) -> None:
    first = stack.start_worker()
    jobs = [
        stack.producer.enqueue(
            {
                "input": {"prompt": f"crash {i}", "force_single": True},
                "webhook_url": stack.receiver.url,
            }
        ).id
        for i in range(6)
    ]
    for job_id in jobs:
        stack.wait(job_id, lambda r: r.status in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS))
    held = stack.redis.hlen("unacked")
    assert held >= 1, "the worker should be holding countdown polls"
    first.kill()
    assert not first.alive()
    stack.start_worker()
    for job_id in jobs:
        record = stack.wait(job_id, timeout=90)
        assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
        stack.wait_webhook(job_id, timeout=30)
    delivered = stack.receiver.events_by_id()
    assert {f"msg_{j}" for j in jobs} <= set(delivered)
