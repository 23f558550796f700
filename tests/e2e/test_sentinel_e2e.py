"""High availability with real processes: a master and a replica watched by three Sentinels
(``redis-server --sentinel``), two workers and a producer on ``REDIS_URL=sentinel://…``. The
master is killed while jobs run: every job still ends, each with one upstream submit (or an
ambiguous one, counted), one set of S3 objects and one webhook id; no worker exits; the
client and the CLI find the new master."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import boto3
import pytest
from click.testing import CliRunner

from api_contracts.jobs import JobStatus
from worker.cli import main
from worker.devtools.embedded import EmbeddedS3, EmbeddedSentinelGroup
from worker.devtools.emulator import EmulatorConfig, EmulatorServer
from worker.devtools.receiver import WebhookReceiver
from worker.producer.client import Client
from worker.producer.producer import Producer
from worker.queueing.run import create_app
from worker.settings import load_settings

from .conftest import BUCKET, TOKEN, WEBHOOK_SECRET, Stack, stack_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ha(
    s3_server: EmbeddedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, EmbeddedSentinelGroup]]:
    group = EmbeddedSentinelGroup().start()
    emulator = EmulatorServer(
        EmulatorConfig(token=TOKEN, queue_s=0.2, run_s=3.0, capacity=32, seed=4),
        host="127.0.0.1",
        port=0,
    ).start()
    receiver = WebhookReceiver(WEBHOOK_SECRET).start()
    s3_server.create_bucket(BUCKET)
    env = stack_env(
        group.url,
        s3_server,
        emulator,
        REDIS_SENTINEL_MASTER=group.MASTER_NAME,
        BROKER_VISIBILITY_TIMEOUT_S="3600",
        RECONCILE_INTERVAL_S="1",
        RECONCILE_GRACE_S="1",
        POLL_MAX_INTERVAL_S="1",
    )
    app = create_app(load_settings(environ=env))
    stack = Stack(
        redis=app.runtime.redis,
        redis_url=group.url,
        s3=s3_server,
        emulator=emulator,
        receiver=receiver,
        env=env,
        app=app,
        producer=Producer(app.runtime, app),
        log_dir=tmp_path_factory.mktemp("ha-worker-logs"),
    )
    try:
        yield stack, group
    finally:
        for worker in stack.workers:
            worker.close()
        app.close_runtime()
        receiver.close()
        emulator.close()
        group.close()


@pytest.mark.timeout(150)
def test_a_failover_under_load_loses_no_job(ha: tuple[Stack, EmbeddedSentinelGroup]) -> None:
    stack, group = ha
    stack.start_worker()
    stack.start_worker()
    prompts = [f"ha job {i}" for i in range(10)]
    jobs = [
        stack.producer.enqueue({"input": {"prompt": p}, "webhook_url": stack.receiver.url}).id
        for p in prompts
    ]
    for job_id in jobs:
        stack.wait(job_id, lambda r: r.status in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS))
    time.sleep(1.2)  # replication and AOF everysec have the records
    old = group.current_master_port()
    assert old is not None
    group.server_on(old).kill()
    started = time.monotonic()
    new = group.wait_failover(old)
    assert new != old

    for job_id in jobs:
        record = stack.wait(job_id, timeout=90)
        assert record.status == JobStatus.SUCCEEDED, (record.status, record.error)
        stack.wait_webhook(job_id, timeout=30)
    recovered_s = time.monotonic() - started

    submits = Counter(r["prompt"] for r in stack.emulator.emulator.requests_snapshot())
    ambiguous = stack.producer.rt.store.stats().get("ambiguous_submits", 0)
    extra = sum(submits[p] - 1 for p in prompts)
    assert all(submits[p] >= 1 for p in prompts)
    assert extra <= ambiguous, (submits, ambiguous)  # every second submit was counted
    events = stack.receiver.events_by_id()
    assert {f"msg_{j}" for j in jobs} <= set(events)
    s3 = boto3.client("s3", endpoint_url=stack.s3.endpoint_url)
    for job_id in jobs:
        record = stack.producer.get(job_id)
        keys = {o.key for o in record.outputs}
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"e2e/{job_id}/")
        assert {o["Key"] for o in listed.get("Contents", [])} == keys
    for worker in stack.workers:
        assert worker.alive(), f"a worker exited:\n{worker.log_text()[-3000:]}"
    assert recovered_s < 90

    # the producer side finds the new master too: a fresh client and the CLI
    with Client(settings=load_settings(environ=stack.env)) as client:
        assert client.get(jobs[0]).status == JobStatus.SUCCEEDED
    shown = CliRunner().invoke(main, ["status", jobs[0], "--json"], env=stack.env)
    assert shown.exit_code == 0, shown.output
    assert '"succeeded"' in shown.stdout
