"""Deadlines and the SSRF guard at delivery time, with a real worker (private networks off)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from api_contracts.jobs import JobStatus, WebhookState
from api_contracts.messages import QUEUE_SUBMIT, TASK_SUBMIT
from worker.devtools.emulator import EmulatorConfig
from worker.errors import InvalidRequestError
from worker.producer.producer import new_job_id

from .conftest import TOKEN, Stack, assert_clean_log

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(stack_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.2, capacity=16, seed=5),
        JOB_DEADLINE_S="3",
        ALLOW_PRIVATE_NETWORKS="false",
    )
    s.start_worker()
    yield s
    assert_clean_log(s)


def test_deadline_while_queued_cancels_upstream(stack: Stack) -> None:
    stack.emulator.update_config(queue_s=120, run_s=0.2)
    before = stack.emulator.counters()
    job_id = stack.producer.enqueue({"input": {"prompt": "slow queue"}}).id
    record = stack.wait(job_id, timeout=20)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "deadline_exceeded"
    # the writer that failed the job cancels upstream just after: wait for it, then make
    # sure nobody else (the poll and the reconciler both see the deadline) cancels again
    deadline = time.monotonic() + 10
    while stack.emulator.counters()["cancels"] == before["cancels"]:
        assert time.monotonic() < deadline, "upstream request never cancelled"
        time.sleep(0.05)
    time.sleep(1.0)
    after = stack.emulator.counters()
    assert after["cancels"] - before["cancels"] == 1
    assert after["cancelled_by_client"] - before["cancelled_by_client"] == 1


def test_deadline_while_running_fails_without_cancel(stack: Stack) -> None:
    stack.emulator.update_config(queue_s=0, run_s=120)
    before = stack.emulator.counters()
    job_id = stack.producer.enqueue({"input": {"prompt": "slow run"}}).id
    record = stack.wait(job_id, timeout=20)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "deadline_exceeded"
    assert stack.emulator.counters()["cancels"] == before["cancels"]


def test_private_webhook_refused_at_submit_with_field_error(stack: Stack) -> None:
    with pytest.raises(InvalidRequestError) as info:
        stack.producer.enqueue({"input": {"prompt": "x"}, "webhook_url": "http://169.254.169.254/"})
    assert info.value.errors[0][0] == "webhook_url"
    assert stack.redis.llen(QUEUE_SUBMIT) == 0


def test_private_webhook_refused_at_delivery(stack: Stack) -> None:
    stack.emulator.update_config(queue_s=0.1, run_s=0.2)
    job_id = new_job_id()
    # a producer that skips our client's checks: the worker still refuses to connect
    stack.app.send_task(
        TASK_SUBMIT,
        args=[job_id, {"input": {"prompt": "x"}, "webhook_url": stack.receiver.url}],
        queue=QUEUE_SUBMIT,
    )
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.SUCCEEDED  # downloads from the RunComfy host are allowed
    assert record.webhook is not None and record.webhook.state == WebhookState.FAILED
    error = record.webhook.deliveries[-1].error or ""
    assert error.startswith("webhook_target_forbidden")
    assert not [d for d in stack.receiver.deliveries() if d.webhook_id == record.webhook.id]
