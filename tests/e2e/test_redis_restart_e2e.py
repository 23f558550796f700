"""Redis restarts under live workers (AOF everysec): the workers reconnect and consume again
without exiting, and every job finishes, held countdowns included (the reconciler brings
them back from the job store in seconds, not after the broker's visibility timeout)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from api_contracts.jobs import JobStatus
from worker.devtools.emulator import EmulatorConfig

from .conftest import TOKEN, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    stack = stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.2, run_s=3.0, capacity=32, seed=3),
        redis_aof="everysec",
        BROKER_VISIBILITY_TIMEOUT_S="3600",
        RECONCILE_INTERVAL_S="1",
        RECONCILE_GRACE_S="1",
        POLL_MAX_INTERVAL_S="1",
    )
    stack.start_worker()
    return stack


def run_through(stack: Stack, outage: str, n: int = 6) -> float:
    """Jobs in flight, then the outage; seconds from Redis back to the last job final."""
    assert stack.server is not None
    jobs = [
        stack.producer.enqueue(
            {"input": {"prompt": f"{outage} {i}"}, "webhook_url": stack.receiver.url}
        ).id
        for i in range(n)
    ]
    for job_id in jobs:
        stack.wait(job_id, lambda r: r.status in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS))
    time.sleep(1.2)  # past AOF everysec: the records themselves are on disk
    if outage == "kill -9":
        stack.server.kill()
    else:
        stack.server.stop()
    time.sleep(2.0)
    stack.server.start()
    back = time.monotonic()
    for job_id in jobs:
        record = stack.wait(job_id, timeout=60)
        assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
        stack.wait_webhook(job_id, timeout=30)
    assert {f"msg_{j}" for j in jobs} <= set(stack.receiver.events_by_id())
    for worker in stack.workers:
        assert worker.alive(), f"a worker exited:\n{worker.log_text()[-3000:]}"
    return time.monotonic() - back


@pytest.mark.timeout(120)
def test_workers_ride_out_a_graceful_redis_restart(stack: Stack) -> None:
    assert run_through(stack, "graceful restart") < 45


@pytest.mark.timeout(120)
def test_workers_ride_out_redis_killed_with_aof_everysec(stack: Stack) -> None:
    assert run_through(stack, "kill -9") < 45
