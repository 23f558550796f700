"""Enqueue rate of one producer process: ``Client.submit`` / ``Producer.enqueue`` in a loop,
a batched submit, and the floor: a raw ``delay()`` of a no-op task.

Runs in a child process (``python -m bench.enqueue``) so nothing else shares its GIL; no
worker consumes, the messages just pile up in Redis (flushed after each mode).

There is no batch API in the service yet. ``batched (prototype)`` shows what one would give:
the job records are created through ``JobStore.create_if_absent`` on a redis-py pipeline (one
round trip for the whole batch instead of one per job) and the submit messages are published
inside kombu's ``Producer.batch()`` (one pipelined ``LPUSH`` round trip per flush instead of
one per message). A real ``Client.submit_many`` would also need: validation of every request
first, idempotency keys (``SET NX`` per key, pipelined too, before the creates), and a rule
for a partial failure (the records exist but the publish failed: re-publish the ones still at
``queued``/seq 0, as ``Producer.enqueue`` already does for a single job).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import ROOT, Row, Stack, job_request

WARMUP = 50
BATCH_SIZE = 500


def _publish_batch(kombu_producer: Any) -> contextlib.AbstractContextManager[Any]:
    """kombu's ``Producer.batch()`` (kombu 5.7+: one pipelined LPUSH per flush), else none."""
    batch = getattr(kombu_producer, "batch", None)
    return batch() if batch is not None else contextlib.nullcontext()


def _timed(fn: Callable[[int], None], n: int) -> float:
    fn(WARMUP)
    started = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - started)


def _child(n: int) -> dict[str, Any]:
    """All modes, in this (fresh) process, against ``REDIS_URL`` from the environment."""
    import redis

    from api_contracts.messages import QUEUE_SUBMIT, TASK_SUBMIT
    from bench.baseline_app import noop
    from worker.client import Client
    from worker.producer import Producer, new_job_id, parse_request, submit_message
    from worker.store import JobStore

    url = os.environ["REDIS_URL"]
    flush = redis.Redis.from_url(url)
    requests = [job_request(n=i) for i in range(n)]
    results: dict[str, float] = {}
    client = Client.from_env()
    producer: Producer = client._producer  # the same Producer Client.submit wraps

    def loop_client(count: int) -> None:
        for i in range(count):
            client.submit(requests[i % n])

    def loop_producer(count: int) -> None:
        for i in range(count):
            producer.enqueue(requests[i % n])

    def batched(count: int) -> None:
        rt, app = producer.rt, producer.app
        for start in range(0, count, BATCH_SIZE):
            chunk = [parse_request(r) for r in requests[start : min(count, start + BATCH_SIZE)]]
            ids = [new_job_id() for _ in chunk]
            with rt.redis.pipeline(transaction=False) as pipe:
                store = JobStore(pipe, ttl_s=rt.settings.job.ttl_s)
                for job_id, req in zip(ids, chunk, strict=True):
                    store.create_if_absent(job_id, req)
                created = pipe.execute()
            with app.producer_or_acquire() as kombu_producer, _publish_batch(kombu_producer):
                for job_id, req, ok in zip(ids, chunk, created, strict=True):
                    if ok:
                        args, kwargs = submit_message(job_id, req)
                        app.send_task(
                            TASK_SUBMIT,
                            args=args,
                            kwargs=kwargs,
                            queue=QUEUE_SUBMIT,
                            routing_key=QUEUE_SUBMIT,
                            producer=kombu_producer,
                        )

    def raw_delay(count: int) -> None:
        for _ in range(count):
            noop.delay()

    for name, fn in (
        ("raw_delay", raw_delay),
        ("client_submit_loop", loop_client),
        ("producer_enqueue_loop", loop_producer),
        ("batched_prototype", batched),
    ):
        flush.flushdb()
        results[name] = _timed(fn, n)
        queued = int(flush.llen(QUEUE_SUBMIT))
        if queued != n + WARMUP:
            raise RuntimeError(f"{name}: {queued} messages queued, expected {n + WARMUP}")
    flush.flushdb()
    client.close()
    flush.close()
    results["kombu_publish_batch"] = float(hasattr(producer.app.amqp.Producer, "batch"))
    return results


def measure(stack: Stack, n: int) -> dict[str, float]:
    """Run the child process against the stack's Redis; jobs/s per mode."""
    env = stack.env()
    out = subprocess.run(
        [sys.executable, "-m", "bench.enqueue", "--child", str(n)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if out.returncode:
        raise RuntimeError(f"enqueue child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(stack: Stack, quick: bool) -> list[Row]:
    """Loop and batched enqueue rates vs raw delay()."""
    n = 600 if quick else 5_000
    stack.redis.flushall()
    rates = measure(stack, n)
    raw = rates["raw_delay"]
    return [
        Row(
            "enqueue: Client.submit in a loop",
            rates["client_submit_loop"],
            "jobs/s",
            baseline=raw,
            target="report (baseline = raw delay() of a no-op)",
            passed=None,
            note=(
                f"{n:,} jobs, one process; Producer.enqueue loop "
                f"{rates['producer_enqueue_loop']:,.0f}/s"
            ),
            details={**rates, "jobs": n},
        ),
        Row(
            "enqueue: batched (prototype, no batch API yet)",
            rates["batched_prototype"],
            "jobs/s",
            baseline=raw,
            target="≥ 2,000 jobs/s",
            passed=rates["batched_prototype"] >= 2000,
            note=f"pipelined JobStore creates + kombu Producer.batch(), {BATCH_SIZE} per batch",
        ),
    ]


def main() -> None:
    """Child entry point: print the rates as JSON."""
    parser = argparse.ArgumentParser(description="enqueue-rate child process")
    parser.add_argument("--child", type=int, required=True, help="jobs per mode")
    args = parser.parse_args()
    print(json.dumps(_child(args.child)))


if __name__ == "__main__":
    main()
