"""Enqueue rate of one producer process: ``Client.submit`` / ``Producer.enqueue`` in a loop,
a batched submit, and the floor: a raw ``delay()`` of a no-op task.

Runs in a child process (``python -m bench.enqueue``) so nothing else shares its GIL; no
worker consumes, the messages just pile up in Redis (flushed after each mode).

``Client.submit_many`` is the batched path: every request validated first, the job records
created in one redis-py pipeline, the submit messages published inside kombu's
``Producer.batch()`` (one pipelined ``LPUSH`` per flush instead of one per message).
"""

from __future__ import annotations

import argparse
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


def _timed(fn: Callable[[int], None], n: int) -> float:
    fn(WARMUP)
    started = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - started)


def _child(n: int) -> dict[str, Any]:
    """All modes, in this (fresh) process, against ``REDIS_URL`` from the environment."""
    import redis

    from api_contracts.messages import QUEUE_SUBMIT
    from bench.baseline_app import noop
    from worker.producer.client import Client
    from worker.producer.producer import Producer

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
        for start in range(0, count, BATCH_SIZE):
            client.submit_many(
                [requests[i % n] for i in range(start, min(count, start + BATCH_SIZE))]
            )

    def raw_delay(count: int) -> None:
        for _ in range(count):
            noop.delay()

    for name, fn in (
        ("raw_delay", raw_delay),
        ("client_submit_loop", loop_client),
        ("producer_enqueue_loop", loop_producer),
        ("client_submit_many", batched),
    ):
        flush.flushdb()
        results[name] = _timed(fn, n)
        queued = int(flush.llen(QUEUE_SUBMIT))
        if queued != n + WARMUP:
            raise RuntimeError(f"{name}: {queued} messages queued, expected {n + WARMUP}")
    flush.flushdb()
    client.close()
    flush.close()
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
            "enqueue: Client.submit_many (batched)",
            rates["client_submit_many"],
            "jobs/s",
            baseline=raw,
            target="≥ 2,000 jobs/s",
            passed=rates["client_submit_many"] >= 2000,
            note=f"{BATCH_SIZE} per call: records in one pipeline, messages in one kombu batch",
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
