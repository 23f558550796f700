"""Sentinel secrets (RunComfy token, S3 secret key, webhook secret) never leave settings: not in
any log line (DEBUG included), job record, Redis command (so no queue message) or webhook body."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Callable

import pytest
import redis
from click.testing import CliRunner

from api_contracts.jobs import JobStatus
from worker.cli import main
from worker.devtools.emulator import EmulatorConfig, FaultRule

from .conftest import TOKEN, WEBHOOK_SECRET, Stack

pytestmark = pytest.mark.e2e

S3_SECRET = "s3-secret-key-sentinel-0123456789"


class Monitor:
    """Every command Redis executes, as text (redis MONITOR), while the test runs."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self.client.monitor() as m:  # type: ignore[no-untyped-call]
            self._ready.set()
            for command in m.listen():
                self.lines.append(str(command.get("command", "")))
                if self._stop.is_set():
                    return

    def stop(self) -> None:
        self._stop.set()
        self.client.ping()  # one more command wakes the listener up
        self._thread.join(5)


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[..., Stack]) -> Stack:
    return stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.2, capacity=16, seed=11),
        AWS_SECRET_ACCESS_KEY=S3_SECRET,
        WORKER_LOG_LEVEL="DEBUG",
    )


def secrets() -> list[str]:
    return [TOKEN, S3_SECRET, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_")]


@pytest.mark.timeout(90)
def test_no_secret_anywhere(stack: Stack) -> None:
    monitor = Monitor(stack.redis_url)
    worker = stack.start_worker()
    stack.receiver.fail_next(1, 500)
    stack.emulator.set_faults([FaultRule(kind="429", endpoint="status", times=1)])
    ok = stack.producer.enqueue(
        {"input": {"prompt": "secret test"}, "webhook_url": stack.receiver.url}
    )
    records = [stack.wait_webhook(ok.id)]
    stack.emulator.update_config(token="rotated-upstream-token")  # our token is now refused
    bad = stack.producer.enqueue(
        {"input": {"prompt": "refused"}, "webhook_url": stack.receiver.url}
    )
    paused = stack.wait(bad.id, lambda r: r.wait is not None and r.wait.reason == "paused")
    stack.emulator.update_config(token=TOKEN)
    pause_reason = stack.redis.get("rcw:pause:probing") or b""
    assert b"401" in pause_reason  # the account circuit says why
    assert CliRunner().invoke(main, ["resume"], env=stack.env).exit_code == 0
    records.append(stack.wait_webhook(bad.id))
    monitor.stop()
    assert records[0].status == JobStatus.SUCCEEDED
    assert paused.status != JobStatus.FAILED
    assert records[1].status == JobStatus.SUCCEEDED
    logs = worker.log_text()
    assert "DEBUG" in logs  # the most talkative level was on
    bodies = [d.body.decode() for d in stack.receiver.deliveries()]
    assert len(bodies) >= 3
    commands = "\n".join(monitor.lines)
    # message bodies travel base64-encoded inside the envelope: decode them too
    decoded = [
        base64.b64decode(b).decode("utf-8", "replace")
        for b in re.findall(r'"body": "([A-Za-z0-9+/=]+)"', commands)
    ]
    assert any("secret test" in d for d in decoded)  # the monitor saw the submit message
    commands += "\n".join(decoded)
    for secret in secrets():
        assert secret not in logs, "secret in a worker log line"
        assert secret not in commands, "secret in a Redis command (message or record)"
        for record in records:
            assert secret not in record.model_dump_json(), "secret in a job record"
        for body in bodies:
            assert secret not in body, "secret in a webhook body"
