"""End-to-end throughput, pool choice and Redis round trips per job.

* Service: zero-latency emulator (queue_s = run_s = 0), one 1024x1024 PNG per job, a real
  webhook receiver. Jobs/s from the first ``Producer.enqueue`` to the last webhook received.
  Every job is exactly four tasks: submit → poll (finds it completed) → archive → notify.
* Floor: ``bench.hop`` chains of four countdown-0 hops over the same queues, same pool, same
  Redis, same Celery configuration, no I/O (bench/baseline_app.py).
* Pools: ``-P prefork -c 2`` against ``-P threads -c 8`` (gevent/eventlet are not installed),
  at zero latency (CPU-bound: two processes use both cores) and with 50 ms added to every
  upstream answer (I/O-bound, as in production: only 2 tasks can wait at once under prefork).
* Poll capacity: the same threads worker, every job an hour long and polling as often as it
  may: status checks/s, so ``x 30 s`` is how many jobs it keeps on a 30 s poll schedule.
* Round trips: redis-py's connection wrapped in the producer (this process) and in the worker
  (bench/_inject/sitecustomize.py) during the threads run; per job, by command name.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from bench import redis_counter
from bench.common import (
    CHAIN_DONE_KEY,
    BenchError,
    Row,
    Stack,
    Worker,
    job_request,
    queue_lengths,
    unacked,
    wait_until,
)
from worker.devtools.emulator import FaultRule

HOPS_PER_JOB = 4
WARMUP_JOBS = 8
UPSTREAM_LATENCY_S = 0.05
#: POLL_MAX_INTERVAL_S of a long-running job: each one costs 1/30 of a status check per second.
POLL_CAP_S = 30.0


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
    stack: Stack,
    phases: list[tuple[int, float]],
    *,
    pool: str,
    concurrency: int,
    count_redis: bool = False,
    poll_capacity: tuple[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Jobs/s of the real pipeline with one worker process, one result per ``(jobs,
    upstream latency s)`` phase. The latency delays every emulator answer (submit, status,
    result, download) without using CPU; it is set on the emulator, so one worker serves
    every phase. Round trips are counted in the first phase only. With ``poll_capacity``
    = ``(jobs, seconds)`` a last result holds the status checks/s of the same worker."""
    stack.redis.flushall()
    stack.emulator.update_config(queue_s=0, run_s=0, capacity=100_000, output_min_bytes=0)
    count_file = tempfile.mktemp(prefix="bench-redis-count-")
    extra = {"BENCH_REDIS_COUNT_FILE": count_file} if count_redis else {}
    producer = stack.producer(**FAST)
    worker = Worker(stack.env(**FAST, **extra), pool=pool, concurrency=concurrency, name=pool)
    results = []
    try:
        worker.start()
        for n, latency_s in phases:
            stack.emulator.set_faults(_latency(latency_s))
            _run_jobs(stack, producer, WARMUP_JOBS, timeout_s=30)
            if count_redis and not results:
                time.sleep(redis_counter.DUMP_INTERVAL_S * 3)
            cpu_before = stack.cpu_seconds(worker)
            worker_before = redis_counter.read_dumps(count_file)
            producer_before = redis_counter.snapshot()
            seconds, _ = _run_jobs(stack, producer, n, timeout_s=max(60.0, n / 2))
            producer_after = redis_counter.snapshot()  # before this process reads Redis again
            cpu = _cpu_ms_per_job(stack.cpu_seconds(worker), cpu_before, n)
            result = {
                "jobs": n,
                "upstream_latency_s": latency_s,
                "seconds": seconds,
                "jobs_per_s": n / seconds,
                "tasks_per_s": n * HOPS_PER_JOB / seconds,
                "worker_rss_mb": worker.rss() / 2**20,
                "cpu_ms_per_job": cpu,
            }
            # The last webhook is in, but the worker still records the delivery (one CAS)
            # and acks the notify: wait until nothing is held or queued.
            wait_until(lambda: _idle(stack), 10, "worker to go idle")
            if count_redis and not results:
                time.sleep(redis_counter.DUMP_INTERVAL_S * 3)  # let the dump catch up
                after = redis_counter.read_dumps(count_file)
                result["worker_redis"] = redis_counter.diff(after, worker_before)
                result["producer_redis"] = redis_counter.diff(producer_after, producer_before)
            results.append(result)
        if poll_capacity is not None:
            results.append(_poll_capacity(stack, producer, *poll_capacity))
            worker.kill()  # thousands of due polls: nothing worth a warm shutdown
    finally:
        stack.emulator.set_faults([])
        stack.emulator.update_config(run_s=0)
        worker.close()
        producer.app.close_runtime()
        for leftover in _dumps(count_file):
            os.unlink(leftover)
    return results


def _poll_capacity(stack: Stack, producer: Any, jobs: int, seconds: float) -> dict[str, Any]:
    """Status checks/s when every one of ``jobs`` generations (an hour long) polls as often
    as ``POLL_MIN_INTERVAL_S`` allows: a backlog, so the worker runs polls flat out."""
    stack.emulator.set_faults([])
    stack.emulator.update_config(run_s=3600)
    before = stack.emulator.counters()["submits"]
    for i in range(jobs):
        producer.enqueue(job_request(n=i))
    wait_until(lambda: stack.emulator.counters()["submits"] - before >= jobs, 60, "submits", 0.05)
    time.sleep(0.3)  # let the backlog form
    calls_before = stack.emulator.counters()["status_calls"]
    started = time.monotonic()
    time.sleep(seconds)
    calls = stack.emulator.counters()["status_calls"] - calls_before
    elapsed = time.monotonic() - started
    return {"jobs": jobs, "seconds": elapsed, "polls_per_s": calls / elapsed}


def _latency(seconds: float) -> list[FaultRule]:
    if not seconds:
        return []
    return [FaultRule(kind="slow", endpoint="any", times=None, delay_s=seconds)]


def _cpu_ms_per_job(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) * 1000 / n, 2) for name in after}


def _dumps(path: str) -> list[str]:
    folder, name = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(name)]


def _idle(stack: Stack) -> bool:
    return unacked(stack.redis) == 0 and not any(queue_lengths(stack.redis).values())


def bare_chain_throughput(stack: Stack, n: int, *, pool: str, concurrency: int) -> dict[str, Any]:
    """Jobs/s of 4-hop no-I/O chains on the same broker configuration."""
    from api_contracts.messages import ALL_QUEUES

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


def per_job(counts: dict[str, int], jobs: int) -> dict[str, Any]:
    """Round trips per job, in total and by kind (largest first)."""
    kinds = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "round_trips": sum(counts.values()) / jobs,
        "by_kind": {kind: round(n / jobs, 2) for kind, n in kinds},
    }


def kinds_text(per_job_counts: dict[str, Any]) -> str:
    """``EVALSHA 6, HGETALL 4, …``: the kinds of round trip made at least once per two jobs."""
    by_kind = per_job_counts["by_kind"].items()
    return ", ".join(f"{kind} {n:g}" for kind, n in by_kind if n >= 0.5)


def _pool_row(label: str, prefork: dict[str, Any], threads: dict[str, Any]) -> Row:
    better = "threads" if threads["jobs_per_s"] >= prefork["jobs_per_s"] else "prefork"
    return Row(
        f"pool, {label}: prefork -c 2 vs threads -c 8",
        prefork["jobs_per_s"],
        "jobs/s",
        baseline=threads["jobs_per_s"],
        target="report (ratio < 1: threads better)",
        passed=None,
        note=f"{prefork['jobs']} jobs each; {better} is better here",
        details={"prefork": _slim(prefork), "threads": _slim(threads)},
    )


def run(stack: Stack, quick: bool) -> list[Row]:
    """Throughput vs the bare chain, threads vs prefork, and round trips per job."""
    n = 40 if quick else 400
    n_slow = 16 if quick else 120
    slow = UPSTREAM_LATENCY_S
    threads, slow_threads, capacity = service_throughput(
        stack,
        [(n, 0.0), (n_slow, slow)],
        pool="threads",
        concurrency=8,
        count_redis=True,
        poll_capacity=(100, 1.0) if quick else (400, 4.0),
    )
    bare = bare_chain_throughput(stack, n, pool="threads", concurrency=8)
    # Quick mode skips prefork at zero latency: the I/O-bound case is the one that decides.
    prefork_phases = [(n_slow, slow)] if quick else [(n, 0.0), (n_slow, slow)]
    prefork = service_throughput(stack, prefork_phases, pool="prefork", concurrency=2)
    ratio = threads["jobs_per_s"] / bare["jobs_per_s"]
    cpu = threads["cpu_ms_per_job"]
    rows = [
        Row(
            "throughput: jobs/s submit→webhook (threads -c 8)",
            threads["jobs_per_s"],
            "jobs/s",
            baseline=bare["jobs_per_s"],
            target="≥ 2/3 of bare chain",
            passed=ratio >= 2 / 3,
            note=(
                f"{n} jobs, zero-latency emulator; baseline = 4-hop countdown-0 chain, no I/O, "
                f"same pool; worker CPU {cpu['worker']:.0f} ms/job vs "
                f"{bare['cpu_ms_per_job']['worker']:.0f} for the chain"
            ),
            details={"service": _slim(threads), "bare_chain": bare},
        )
    ]
    if not quick:
        rows.append(_pool_row("zero latency", prefork[0], threads))
    rows.append(_pool_row("50 ms upstream latency", prefork[-1], slow_threads))
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
                f"producer {producer['round_trips']:.1f} ({kinds_text(producer)}) + worker "
                f"{worker['round_trips']:.1f} ({kinds_text(worker)}); the MULTI…EXEC pipelines "
                "are kombu's unacked bookkeeping (acks_late)"
            ),
            details={"producer": producer, "worker": worker, "jobs": n},
        )
    )
    sustainable = capacity["polls_per_s"] * POLL_CAP_S
    rows.append(
        Row(
            "poll capacity → jobs kept on a 30 s poll schedule",
            sustainable,
            "jobs",
            target="≥ 10,000 in flight (polls/s × 30 s)",
            passed=sustainable >= 10_000,
            note=(
                f"{capacity['polls_per_s']:.0f} status checks/s per process (threads -c 8, "
                f"{capacity['jobs']} jobs polling back to back, 2 shared cores)"
            ),
            details=capacity,
        )
    )
    return rows


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.endswith("_redis")}
