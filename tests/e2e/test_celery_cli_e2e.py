"""``celery -A worker.app worker`` is as good a way to run the service as ``runcomfy-worker
worker``: same queues, same logging, jobs complete."""

from __future__ import annotations

import json
import sys

import pytest

from api_contracts.jobs import JobStatus, WebhookState
from api_contracts.messages import ALL_QUEUES
from worker.devtools.embedded import WorkerProcess
from worker.devtools.emulator import EmulatorConfig

from .conftest import TOKEN, Stack, assert_clean_log

pytestmark = pytest.mark.e2e


def test_plain_celery_command_runs_the_pipeline(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = stack_factory(EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.2, seed=4))
    worker = WorkerProcess(
        stack.env,
        command=[sys.executable, "-m", "celery", "-A", "worker.app", "worker"],
        args=["-P", "threads", "-c", "4", "-Q", ",".join(ALL_QUEUES)],
        log_path=str(stack.log_dir / "celery-cli.log"),
    )
    stack.workers.append(worker)
    worker.start()
    job_id = stack.producer.enqueue(
        {"input": {"prompt": "via celery -A"}, "webhook_url": stack.receiver.url}
    ).id
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.SUCCEEDED
    assert record.webhook is not None and record.webhook.state == WebhookState.DELIVERED
    lines = [json.loads(x) for x in worker.log_text().splitlines() if x.startswith("{")]
    tagged = [x for x in lines if x.get("job_id") == job_id]
    assert tagged, "structured log lines carry the job id"
    assert {x.get("task") for x in tagged} >= {"runcomfy.submit", "runcomfy.archive"}
    assert any(x.get("request_id") == record.request_id for x in tagged)
    assert_clean_log(stack)
