"""Poison messages against a real ``-c 2`` worker on a real Redis: every message the worker
cannot turn into a runnable task ends in the dead-letter list, acked, and the worker keeps
consuming; ``runcomfy-worker dead-letters`` lists, requeues and purges them.

Before the fix, two raw messages with ``"timelimit": 5`` (Celery expects a 2-list) were
logged as "dropped" by the hardened transport but stayed in kombu's ``unacked`` hash, each
holding one of the two prefetch slots of a ``-c 2`` worker: the worker never took another
message (a job submitted afterwards stayed ``queued``), and after the visibility timeout the
two came back to do the same to the next worker. Bodies that are not ``[args, kwargs,
embed]`` did the same; a non-JSON body, an unknown task name or a bad ETA were acked by
Celery but lost without a trace.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from api_contracts.jobs import JobStatus
from api_contracts.messages import QUEUE_POLL, QUEUE_SUBMIT, TASK_POLL
from worker.cli import main
from worker.constants import DEAD_LETTERS_KEY
from worker.devtools.embedded import WorkerProcess, free_port
from worker.devtools.emulator import EmulatorConfig
from worker.metrics import KOMBU_UNACKED_KEY
from worker.queueing.dead_letters import DeadLetter, DeadLetterStore

from .conftest import TOKEN, Stack, assert_clean_log, succeeded

pytestmark = pytest.mark.e2e

RAW_PRODUCER = Path(__file__).resolve().parents[2] / "examples" / "python_raw_producer.py"


def raw_producer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_raw_producer_dl", RAW_PRODUCER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def envelope(
    *, task: str = TASK_POLL, body: bytes | None = None, **headers: Any
) -> tuple[str, str]:
    """(delivery tag, JSON text) of a Celery protocol 2 envelope on runcomfy.poll."""
    tag = str(uuid.uuid4())
    if body is None:
        body = json.dumps([["no-such-job", 1], {}, {"callbacks": None, "errbacks": None}]).encode()
    head: dict[str, Any] = {
        "lang": "py", "task": task, "id": tag, "timelimit": [None, None], "retries": 0,
    }  # fmt: skip
    head.update(headers)
    text = json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": head,
            "properties": {
                "correlation_id": tag,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": QUEUE_POLL},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": tag,
            },
        }
    )
    return tag, text


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(stack_factory, metrics_port: int) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = stack_factory(EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.2, seed=17))
    # -c 2: prefetch 2 (multiplier 1), so two poison messages held in `unacked` stop it.
    worker = WorkerProcess(
        {**s.env, "WORKER_METRICS_PORT": str(metrics_port)},
        args=["-c", "2", "--without-mingle", "--without-gossip"],
        log_path=str(s.log_dir / "worker-c2.log"),
    )
    s.workers.append(worker)
    worker.start()
    yield s
    assert_clean_log(s)


def dead_entries(stack: Stack) -> list[DeadLetter]:
    return [entry for _, entry in DeadLetterStore(stack.redis).entries()]


def submit(stack: Stack, prompt: str) -> str:
    request = {"input": {"prompt": prompt, "size": "1024x1024", "force_single": True}}
    return stack.producer.enqueue(request).id


def cli(stack: Stack, *args: str) -> Any:
    return CliRunner(env={"REDIS_URL": stack.redis_url}).invoke(
        main, ["dead-letters", *args], catch_exceptions=False
    )


def test_poison_messages_are_dead_lettered_and_acked_and_the_worker_keeps_going(
    stack: Stack, metrics_port: int
) -> None:
    poison = {
        "timelimit-1": envelope(timelimit=5),  # what a raw producer sent in the incident
        "timelimit-2": envelope(timelimit=5),
        "body-not-3-list": envelope(body=json.dumps({"args": "x"}).encode()),
        "body-not-json": envelope(body=b"\x00not json"),
        "unknown-task": envelope(task="runcomfy.no_such_task"),
        "bad-eta": envelope(eta="yesterday"),
    }
    for _, text in poison.values():
        stack.redis.lpush(QUEUE_POLL, text)
    garbage = b"\xff\x00not json at all"
    stack.redis.lpush(QUEUE_POLL, garbage)

    # Before the fix the worker stopped at the first two: this job stayed `queued`.
    record = stack.wait(submit(stack, "after the poison"), timeout=20)
    assert succeeded(record), record.error

    # Nothing poisonous is held: no prefetch slot, nothing to come back after the timeout.
    unacked = {
        k.decode() if isinstance(k, bytes) else k for k in stack.redis.hkeys(KOMBU_UNACKED_KEY)
    }
    assert not unacked & {tag for tag, _ in poison.values()}
    assert stack.redis.llen(QUEUE_POLL) == 0

    entries = dead_entries(stack)
    by_tag = {}
    for entry in entries:
        assert entry.queue == QUEUE_POLL and entry.at and entry.id and not entry.truncated
        if entry.reason != "undecodable_envelope":
            by_tag[json.loads(entry.raw)["properties"]["delivery_tag"]] = entry
    reasons = {name: by_tag[tag].reason for name, (tag, _) in poison.items()}
    assert reasons == {
        "timelimit-1": "invalid_headers",
        "timelimit-2": "invalid_headers",
        "body-not-3-list": "invalid_body",
        "body-not-json": "invalid_body",
        "unknown-task": "unknown_task",
        "bad-eta": "invalid_headers",
    }
    assert "timelimit" in by_tag[poison["timelimit-1"][0]].detail
    # the raw message is the one pushed (field for field)
    assert json.loads(by_tag[poison["timelimit-1"][0]].raw) == json.loads(poison["timelimit-1"][1])
    undecodable = [e for e in entries if e.reason == "undecodable_envelope"]
    assert len(undecodable) == 1 and undecodable[0].raw_message() == garbage
    assert len(entries) == len(poison) + 1

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    counted = {
        m[1]: float(m[2])
        for m in re.finditer(r'^runcomfy_dead_letters_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }
    assert counted == {
        "invalid_headers": 3,
        "invalid_body": 2,
        "unknown_task": 1,
        "undecodable_envelope": 1,
    }
    assert all(w.alive() for w in stack.workers)
    assert "Unrecoverable error" not in stack.workers[0].log_text()


def test_cli_lists_shows_requeues_and_purges(stack: Stack) -> None:
    # A valid message dead-lettered earlier (say, by a worker that lacked the task): requeued,
    # it runs. The raw producer's envelope, exactly as a producer would LPUSH it.
    job_id = f"dl-{uuid.uuid4().hex[:12]}"
    request = {"input": {"prompt": "requeued", "size": "1024x1024", "force_single": True}}
    raw = json.dumps(raw_producer().build_message(job_id, request))
    store = DeadLetterStore(stack.redis)
    entry = store.push("unknown_task", QUEUE_SUBMIT, raw, "no task named 'runcomfy.submit'")
    total = store.count()

    listed = cli(stack, "list", "--json", "--limit", "1000")
    assert listed.exit_code == 0
    rows = json.loads(listed.stdout)
    assert len(rows) == total and rows[0]["id"] == entry.id and rows[0]["index"] == 0
    assert {"reason", "at", "queue", "raw", "detail"} <= set(rows[0])
    human = cli(stack, "list", "--limit", "2")
    assert human.exit_code == 0 and entry.id in human.stdout and f"of {total} shown" in human.stdout

    shown = cli(stack, "show", entry.id)
    assert shown.exit_code == 0
    assert "unknown_task" in shown.stdout and QUEUE_SUBMIT in shown.stdout
    assert "body (base64-decoded):" in shown.stdout and job_id in shown.stdout
    assert cli(stack, "show", "not-an-index").exit_code == 2
    assert cli(stack, "show", "99999").exit_code == 1

    requeued = cli(stack, "requeue", entry.id)
    assert requeued.exit_code == 0, requeued.output
    assert f"onto {QUEUE_SUBMIT}" in requeued.stdout
    assert succeeded(stack.wait(job_id, timeout=20))
    assert entry.id not in {e.id for e in dead_entries(stack)}
    assert cli(stack, "requeue", entry.id).exit_code == 1  # gone now
    assert cli(stack, "requeue").exit_code == 2  # neither INDEX|ID nor --all

    # --all: what cannot run comes straight back (as new entries); the worker survives it.
    before = stack.redis.llen(DEAD_LETTERS_KEY)
    again = cli(stack, "requeue", "--all")
    assert again.exit_code == 0, again.output
    assert f"requeued {before} dead letter(s)" in again.stdout

    def all_back() -> bool:
        return stack.redis.llen(DEAD_LETTERS_KEY) == before

    stack.wait(submit(stack, "after requeue --all"), lambda r: r.status.is_terminal and all_back())
    assert stack.redis.llen(QUEUE_POLL) == 0

    refused = CliRunner(env={"REDIS_URL": stack.redis_url}).invoke(
        main, ["dead-letters", "purge"], input=""
    )
    assert refused.exit_code == 2 and stack.redis.llen(DEAD_LETTERS_KEY) == before
    purged = cli(stack, "purge", "--yes")
    assert purged.exit_code == 0 and f"deleted {before} dead letter(s)" in purged.stdout
    assert stack.redis.llen(DEAD_LETTERS_KEY) == 0
    assert cli(stack, "list").stdout.strip() == "no dead letters"
    assert all(w.alive() for w in stack.workers)
    record = stack.wait(submit(stack, "still consuming"))
    assert record.status == JobStatus.SUCCEEDED
