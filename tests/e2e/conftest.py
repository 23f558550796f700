"""End-to-end stack: real Redis, moto S3 over HTTP, the RunComfy emulator over HTTP, a
webhook receiver, and real ``runcomfy-worker worker`` subprocesses."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from api_contracts.jobs import JobRecord, JobStatus
from worker.devtools.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from worker.devtools.emulator import EmulatorConfig, EmulatorServer
from worker.devtools.receiver import WebhookReceiver
from worker.producer.producer import Producer
from worker.queueing.config import ServiceCelery
from worker.queueing.run import create_app
from worker.settings import load_settings

pytestmark = pytest.mark.e2e

TOKEN = "e2e-runcomfy-token-sentinel"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-sentinel-123").decode()
BUCKET = "e2e-archive"


@dataclass
class Stack:
    """Everything an end-to-end test talks to."""

    redis: redis.Redis
    redis_url: str
    s3: EmbeddedS3
    emulator: EmulatorServer
    receiver: WebhookReceiver
    env: dict[str, str]
    app: ServiceCelery
    producer: Producer
    log_dir: Path = field(default_factory=Path)
    workers: list[WorkerProcess] = field(default_factory=list)
    server: EmbeddedRedis | None = None

    def wait(
        self,
        job_id: str,
        until: Callable[[JobRecord], bool] = lambda r: r.status.is_terminal,
        timeout: float = 30.0,
    ) -> JobRecord:
        """Read the record until ``until`` holds (tests only: a short sleep between reads)."""
        deadline = time.monotonic() + timeout
        record = self._get(job_id)
        while record is None or not until(record):
            if time.monotonic() > deadline:
                logs = "\n".join(w.log_text()[-3000:] for w in self.workers)
                raise AssertionError(f"job {job_id} stuck at {record!r}\n--- worker logs:\n{logs}")
            time.sleep(0.05)
            record = self._get(job_id)
        return record

    def _get(self, job_id: str) -> JobRecord | None:
        try:
            job = self.producer.rt.store.get(job_id)
        except redis.ConnectionError:  # Redis restarting or failing over: look again
            return None
        return job.record if job else None

    def wait_webhook(self, job_id: str, timeout: float = 20.0) -> JobRecord:
        """Wait until the job's webhook is delivered or failed for good."""
        return self.wait(
            job_id,
            lambda r: r.webhook is not None and r.webhook.state.value != "pending",
            timeout,
        )

    def start_worker(self, **extra_env: str) -> WorkerProcess:
        """Start one more worker with the stack's environment (plus ``extra_env``)."""
        env = {**self.env, **extra_env}
        log_path = str(self.log_dir / f"worker-{len(self.workers)}.log")
        worker = WorkerProcess(
            env, args=["-c", "8", "--without-mingle", "--without-gossip"], log_path=log_path
        )
        self.workers.append(worker)
        return worker.start()


def stack_env(
    redis_url: str, s3: EmbeddedS3, emulator: EmulatorServer, **extra: str
) -> dict[str, str]:
    """The worker environment for this stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(s3.credentials_env())
    env.update(
        {
            "REDIS_URL": redis_url,
            "RUNCOMFY_BASE_URL": emulator.base_url,
            "RUNCOMFY_API_TOKEN": TOKEN,
            "S3_BUCKET": BUCKET,
            "S3_PREFIX": "e2e/",
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "WEBHOOK_RETRY_SCHEDULE": "0.3,0.5,0.5,0.5,1",
            "WEBHOOK_TIMEOUT_S": "2",
            "ALLOW_PRIVATE_NETWORKS": "true",
            "POLL_INITIAL_DELAY_S": "0.2",
            "POLL_MIN_INTERVAL_S": "0.2",
            "POLL_MAX_INTERVAL_S": "1",
            "JOB_DEADLINE_S": "60",
            "RUNCOMFY_READ_TIMEOUT_S": "2",
            "S3_RETRY_WINDOW_S": "5",
            "WORKER_LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def stack_factory(
    s3_server: EmbeddedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Stack]]:
    """Build a Stack with its own Redis and emulator; everything is torn down at module end."""
    created: list[tuple[Stack, EmbeddedRedis]] = []

    def build(
        emulator_config: EmulatorConfig | None = None,
        *,
        redis_aof: str | None = None,
        **env_extra: str,
    ) -> Stack:
        s3_server.create_bucket(BUCKET)
        server = EmbeddedRedis(aof=redis_aof).start()
        emu = EmulatorServer(
            emulator_config or EmulatorConfig(token=TOKEN, queue_s=0.2, run_s=0.3, seed=7),
            host="127.0.0.1",
            port=0,
        ).start()
        receiver = WebhookReceiver(WEBHOOK_SECRET).start()
        env = stack_env(server.url, s3_server, emu, **env_extra)
        app = create_app(load_settings(environ=env))
        stack = Stack(
            redis=redis.Redis.from_url(server.url),
            redis_url=server.url,
            s3=s3_server,
            emulator=emu,
            receiver=receiver,
            env=env,
            app=app,
            producer=Producer(app.runtime, app),
            log_dir=tmp_path_factory.mktemp("worker-logs"),
            server=server,
        )
        created.append((stack, server))
        return stack

    yield build
    for stack, server in created:
        for w in stack.workers:
            w.close()
        stack.app.close_runtime()
        stack.receiver.close()
        stack.emulator.close()
        stack.redis.close()
        server.close()


def assert_clean_log(stack: Stack) -> None:
    """No secret in any worker log line."""
    for w in stack.workers:
        text = w.log_text()
        assert TOKEN not in text
        assert WEBHOOK_SECRET not in text
        assert WEBHOOK_SECRET.removeprefix("whsec_") not in text


def succeeded(record: JobRecord) -> bool:
    """Predicate: the job succeeded."""
    return record.status == JobStatus.SUCCEEDED


__all__ = ["BUCKET", "TOKEN", "WEBHOOK_SECRET", "Path", "Stack", "assert_clean_log", "succeeded"]
