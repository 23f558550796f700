"""End-to-end throughput, pool choice and Redis round trips per job.

* Service: zero-latency emulator (queue_s = run_s = 0), one 1024x1024 PNG per job, a real
  webhook receiver. Jobs/s from the first ``Producer.enqueue`` to the last webhook received.
  Every job is exactly four tasks: submit → poll (finds it completed) → archive → notify.
* Floor: ``bench.hop`` chains of four countdown-0 hops over the same queues, same pool, same
  Redis, same Celery configuration, no I/O (bench/baseline_app.py).
* Pools: the service again with ``-P prefork -c 2`` (gevent/eventlet are not installed).
* Round trips: redis-py's connection wrapped in the producer (this process) and in the worker
  (bench/_inject/sitecustomize.py) during the threads run; per job, by command name.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from bench import redis_counter
from bench.common import BenchError, Row, Stack, Worker, job_request, wait_until

HOPS_PER_JOB = 4
WARMUP_JOBS = 8


#: Settings for a zero-latency run: poll at once, retry webhooks quickly.
FAST = {
    "POLL_INITIAL_DELAY_S": "0",
    "POLL_MIN_INTERVAL_S": "0.05",
    "POLL_MAX_INTERVAL_S": "1",
    "WEBHOOK_RETRY_SCHEDULE": "0.5,1,1",
}


def _run_jobs(stack: Stack, producer: Any, n: int, timeout_s: float) -> tuple[float, list[str]]:
    """Enqueue ``n`` jobs, wait for their webhooks; returns (seconds, job ids)."""
    url = stack.receiver.url
    before = len(stack.receiver.deliveries())
    started = time.time()
    ids = [producer.enqueue(job_request(url, i)).id for i in range(n)]
    stack.receiver.wait_for(lambda d: len(d) >= before + n, timeout=timeout_s)
    arrived = stack.receiver.deliveries()[before:]
    bad = [d for d in arrived if not d.verified or d.event_type != "job.succeeded"]
    if bad:
        raise BenchError(f"{len(bad)} webhook(s) not a verified job.succeeded: {bad[0].error}")
    return max(d.received_at for d in arrived) - started, ids


def service_throughput(
    stack: Stack, n: int, *, pool: str, concurrency: int, count_redis: bool = False
) -> dict[str, Any]:
    """Jobs/s of the real pipeline with one worker process."""
    stack.redis.flushall()
    stack.emulator.update_config(queue_s=0, run_s=0, capacity=100_000, output_min_bytes=0)
    count_file = tempfile.mktemp(prefix="bench-redis-count-")
    extra = {"BENCH_REDIS_COUNT_FILE": count_file} if count_redis else {}
    producer = stack.producer(**FAST)
    worker = Worker(stack.env(**FAST, **extra), pool=pool, concurrency=concurrency, name=pool)
    try:
        worker.start()
        _run_jobs(stack, producer, WARMUP_JOBS, timeout_s=30)
        time.sleep(redis_counter.DUMP_INTERVAL_S * 3)
        worker_before = redis_counter.read_dumps(count_file)
        producer_before = redis_counter.snapshot()
        cpu_before = stack.cpu_seconds(worker)
        seconds, _ = _run_jobs(stack, producer, n, timeout_s=max(60.0, n / 5))
        cpu = _cpu_ms_per_job(stack.cpu_seconds(worker), cpu_before, n)
        # The last webhook is in, but the worker still records the delivery (one CAS) and
        # acks the notify; wait until nothing is held or queued, then let the dump catch up.
        wait_until(lambda: _idle(stack), 10, "worker to go idle")
        time.sleep(redis_counter.DUMP_INTERVAL_S * 3)
        worker_counts = redis_counter.diff(redis_counter.read_dumps(count_file), worker_before)
        producer_counts = redis_counter.diff(redis_counter.snapshot(), producer_before)
        rss = worker.rss()
    finally:
        worker.close()
        producer.app.close_runtime()
        for leftover in _dumps(count_file):
            os.unlink(leftover)
    return {
        "jobs": n,
        "seconds": seconds,
        "jobs_per_s": n / seconds,
        "tasks_per_s": n * HOPS_PER_JOB / seconds,
        "worker_rss_mb": rss / 2**20,
        "cpu_ms_per_job": cpu,
        "worker_redis": worker_counts,
        "producer_redis": producer_counts,
    }


def _cpu_ms_per_job(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) * 1000 / n, 2) for name in after}


def _dumps(path: str) -> list[str]:
    folder, name = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(name)]


def _idle(stack: Stack) -> bool:
    from bench.common import queue_lengths, unacked

    return unacked(stack.redis) == 0 and not any(queue_lengths(stack.redis).values())


def bare_chain_throughput(stack: Stack, n: int, *, pool: str, concurrency: int) -> dict[str, Any]:
    """Jobs/s of 4-hop no-I/O chains on the same broker configuration."""
    from api_contracts.messages import ALL_QUEUES
    from bench.baseline_app import CHAIN_DONE_KEY

    stack.redis.flushall()
    worker = Worker(
        stack.env(**FAST),
        pool=pool,
        concurrency=concurrency,
        app_module="bench.baseline_app",
        queues=",".join(ALL_QUEUES),
        name=f"bare-{pool}",
    )
    app = stack.producer(**FAST).app
    first = ALL_QUEUES[0]

    def chains(count: int, offset: int) -> float:
        target = offset + count
        started = time.time()
        for i in range(count):
            app.send_task("bench.hop", args=[offset + i, 1], queue=first, routing_key=first)
        wait_until(
            lambda: int(stack.redis.get(CHAIN_DONE_KEY) or 0) >= target,
            max(60.0, count / 5),
            "bare chains",
            interval_s=0.005,
        )
        return time.time() - started

    try:
        worker.start()
        chains(WARMUP_JOBS, 0)
        cpu_before = stack.cpu_seconds(worker)
        seconds = chains(n, WARMUP_JOBS)
        cpu = _cpu_ms_per_job(stack.cpu_seconds(worker), cpu_before, n)
    finally:
        worker.close()
        app.close_runtime()
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds, "cpu_ms_per_job": cpu}


def per_job(counts: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Round trips and commands per job, largest first."""
    commands = sorted(counts["commands"].items(), key=lambda kv: -kv[1])
    return {
        "round_trips": counts["round_trips"] / jobs,
        "commands": {name: round(c / jobs, 2) for name, c in commands},
    }


def run(stack: Stack, quick: bool) -> list[Row]:
    """Throughput vs the bare chain, threads vs prefork, and round trips per job."""
    n = 120 if quick else 400
    threads = service_throughput(stack, n, pool="threads", concurrency=8, count_redis=True)
    bare = bare_chain_throughput(stack, n, pool="threads", concurrency=8)
    prefork = service_throughput(stack, n, pool="prefork", concurrency=2)
    ratio = threads["jobs_per_s"] / bare["jobs_per_s"]
    rows = [
        Row(
            "throughput: jobs/s submit→webhook (threads -c 8)",
            threads["jobs_per_s"],
            "jobs/s",
            baseline=bare["jobs_per_s"],
            target="≥ 2/3 of bare chain",
            passed=ratio >= 2 / 3,
            note=f"{n} jobs; baseline = bare 4-hop countdown-0 chain, no I/O, same pool",
            details={"service": _slim(threads), "bare_chain": bare},
        ),
        Row(
            "pool: prefork -c 2 vs threads -c 8 (service jobs/s)",
            prefork["jobs_per_s"],
            "jobs/s",
            baseline=threads["jobs_per_s"],
            target="report (higher is better)",
            passed=None,
            note="threads is better"
            if threads["jobs_per_s"] >= prefork["jobs_per_s"]
            else "prefork is better",
            details={"prefork": _slim(prefork), "threads": _slim(threads)},
        ),
    ]
    worker = per_job(threads["worker_redis"], n)
    producer = per_job(threads["producer_redis"], n)
    rows.append(
        Row(
            "redis round trips per job (producer + worker)",
            producer["round_trips"] + worker["round_trips"],
            "RTT/job",
            target="report; cut what the states do not need",
            passed=None,
            note=(
                f"producer {producer['round_trips']:.1f} + worker {worker['round_trips']:.1f}; "
                "wrapped redis-py connections, threads run"
            ),
            details={"producer": producer, "worker": worker, "jobs": n},
        )
    )
    return rows


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.endswith("_redis")}
