"""Producers in other languages: a job enqueued with plain Redis commands (no Celery, no
kombu) completes on a real worker. Runs the code in examples/ itself, so it cannot rot."""

from __future__ import annotations

import ast
import base64
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from api_contracts.jobs import JobStatus
from api_contracts.messages import QUEUE_SUBMIT, TASK_SUBMIT
from worker.devtools.embedded import EmbeddedRedis
from worker.devtools.emulator import EmulatorConfig
from worker.queueing.run import create_app
from worker.settings import RedisSettings, Settings

from .conftest import TOKEN, WEBHOOK_SECRET, Stack, assert_clean_log

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RAW_PRODUCER = EXAMPLES / "python_raw_producer.py"
NODE_PRODUCER = EXAMPLES / "node_producer" / "index.mjs"


def load_example(path: Path) -> ModuleType:
    """Import an example script as a module (examples/ is not a package)."""
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stack(stack_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = stack_factory(EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.3, seed=11))
    s.start_worker()
    yield s
    assert_clean_log(s)


@pytest.fixture(scope="module")
def example_receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """examples/webhook_receiver.py serving on a free port; yields (url, events handled)."""
    module = load_example(EXAMPLES / "webhook_receiver.py")
    handled: list[tuple[str, dict[str, Any]]] = []
    server = module.make_server(
        WEBHOOK_SECRET, "127.0.0.1", 0, on_event=lambda wid, ev: handled.append((wid, ev))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/runcomfy", handled
    server.shutdown()
    server.server_close()
    thread.join(5)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_raw_producer_needs_only_redis() -> None:
    third_party = imported_modules(RAW_PRODUCER) - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"redis"}


def test_envelope_is_what_send_task_pushes(redis_server: EmbeddedRedis) -> None:
    """Field for field the message Celery's own client LPUSHes (ids and origin aside)."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(QUEUE_SUBMIT)
    app = create_app(Settings(redis=RedisSettings(url=redis_server.url)))
    request = {"input": {"prompt": "a cube", "width×height": "1024x1024(1:1)"}}
    job_id = uuid.uuid4().hex
    try:
        app.send_task(
            TASK_SUBMIT,
            args=[job_id, request],
            kwargs={},
            queue=QUEUE_SUBMIT,
            routing_key=QUEUE_SUBMIT,
        )
        celery_message = json.loads(client.rpop(QUEUE_SUBMIT))  # type: ignore[arg-type]
    finally:
        app.close()
    raw = load_example(RAW_PRODUCER).build_message(
        job_id, request, task_id=celery_message["headers"]["id"]
    )
    assert set(raw) == set(celery_message)
    assert set(raw["headers"]) == set(celery_message["headers"])
    assert set(raw["properties"]) == set(celery_message["properties"])
    for part, varying in (("headers", {"origin"}), ("properties", {"reply_to", "delivery_tag"})):
        for key, value in celery_message[part].items():
            if key not in varying:
                assert raw[part][key] == value, (part, key)
    assert json.loads(base64.b64decode(raw["body"])) == json.loads(
        base64.b64decode(celery_message["body"])
    )
    for key in ("content-type", "content-encoding"):
        assert raw[key] == celery_message[key]
    client.close()


def test_raw_python_producer_job_completes_and_example_receiver_verifies(
    stack: Stack, example_receiver: tuple[str, list[tuple[str, dict[str, Any]]]]
) -> None:
    url, handled = example_receiver
    proc = subprocess.run(
        [
            sys.executable, str(RAW_PRODUCER), "--redis-url", stack.redis_url,
            "--prompt", "a lighthouse, from raw Redis", "--size", "2304x1728",
            "--force-single", "--webhook-url", url, "--metadata", "order=99",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.request is not None
    assert record.request.input.size == "2304x1728(4:3)" and record.request.input.force_single
    assert record.metadata == {"order": "99"}
    assert len(record.outputs) == 1
    assert record.webhook is not None and record.webhook.state.value == "delivered"
    events = [event for _, event in handled if event["data"]["id"] == job_id]
    assert [e["type"] for e in events] == ["job.succeeded"]
    assert events[0]["data"]["outputs"][0]["sha256"] == record.outputs[0].sha256


def test_same_raw_message_twice_runs_the_job_once(stack: Stack) -> None:
    producer = load_example(RAW_PRODUCER)
    job_id = f"order-{uuid.uuid4().hex[:12]}"
    before = stack.emulator.counters()["submits"]
    request = {"input": {"prompt": "at most once", "size": "1024x1024", "force_single": True}}
    for _ in range(2):
        assert producer.enqueue(stack.redis, request, job_id) == job_id
    assert stack.wait(job_id).status == JobStatus.SUCCEEDED
    assert stack.emulator.counters()["submits"] - before == 1


def test_example_receiver_refuses_bad_signatures_and_dedupes(
    example_receiver: tuple[str, list[tuple[str, dict[str, Any]]]],
) -> None:
    url, handled = example_receiver
    body = json.dumps({"type": "job.failed", "timestamp": "x", "data": {"id": "j1"}})
    now = datetime.now(UTC)
    signature = Webhook(WEBHOOK_SECRET).sign("msg_dup", now, body)
    headers = {
        "webhook-id": "msg_dup",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    before = len(handled)
    for _ in range(2):
        assert httpx.post(url, content=body, headers=headers).status_code == 204
    assert len(handled) == before + 1  # the retry is acknowledged, not processed again
    forged = {**headers, "webhook-id": "msg_forged"}
    assert httpx.post(url, content=body + " ", headers=forged).status_code == 400
    assert len(handled) == before + 1


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_producer_builds_a_message_the_worker_runs(stack: Stack) -> None:
    check = subprocess.run(
        ["node", "--check", str(NODE_PRODUCER)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    job_id = f"node-{uuid.uuid4().hex[:12]}"
    request = {
        "input": {"prompt": "a fox, from Node", "width×height": "1024x1024(1:1)"},
        "metadata": {"lang": "js"},
    }
    # Build the envelope with the example's own code (its Redis client needs `npm install`,
    # which CI does not do); push it with plain LPUSH.
    script = (
        f"import {{ buildMessage }} from {json.dumps(NODE_PRODUCER.as_uri())};\n"
        f"process.stdout.write(JSON.stringify(buildMessage({json.dumps(job_id)}, "
        f"{json.dumps(request)})));\n"
    )
    built = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    envelope = json.loads(built.stdout)
    python_twin = load_example(RAW_PRODUCER).build_message(job_id, request)
    assert set(envelope) == set(python_twin)
    assert set(envelope["headers"]) == set(python_twin["headers"])
    assert set(envelope["properties"]) == set(python_twin["properties"])
    stack.redis.lpush(QUEUE_SUBMIT, built.stdout)
    record = stack.wait(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.metadata == {"lang": "js"}
