"""Jobs in flight per worker process: memory, and submit latency while they are held.

* Waiting jobs: the emulator runs every request for an hour; the service worker (threads
  -c 8, first check after 15 min) submits N jobs. A 15 min wait is longer than a worker
  holds a countdown, so each job's first check is parked in the job store's due index
  (Redis) instead of held in the worker: worker RSS (VmRSS of the process and its children)
  is read idle and with all N waiting (growth per 1,000), and Redis memory per job.
* Latency under load: 20 probe jobs go through the idle worker and again while it holds the
  N polls; median enqueue → submitted upstream (the step a new job waits for).
* Whether one process can also *poll* that many on schedule is the poll-capacity row of
  bench/throughput.py (status checks/s x 30 s).
* Baseline: a naive worker (bench/baseline_app.py ``naive_poll``: ``time.sleep`` inside the
  task), same pool, holds as many generations in flight as it has threads.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from api_contracts.jobs import JobStatus
from api_contracts.messages import QUEUE_SUBMIT
from bench.common import (
    MIB,
    NAIVE_ACTIVE_KEY,
    Row,
    Stack,
    Worker,
    job_request,
    start_all,
    unacked,
    wait_until,
)
from worker.constants import DUE_KEY

POLL_CAP_S = 30.0
#: The first poll is held for 15 min so that all N stay held while N are submitted (a 10,000
#: job burst takes over a minute); how often polls then run is the poll-capacity figure.
HELD = {
    "POLL_INITIAL_DELAY_S": "900",
    "POLL_MAX_INTERVAL_S": str(POLL_CAP_S),
    "JOB_DEADLINE_S": "7200",
    "WORKER_ETA_TASK_LIMIT": "20000",
    "BROKER_VISIBILITY_TIMEOUT_S": "7200",
}
PROBES = 20
RSS_BUDGET_MB = 200.0
TARGET_JOBS = 10_000


def _settle_rss(worker: Worker, seconds: float = 0.5) -> int:
    """RSS after a short pause (lets freed buffers and GC settle), the max of a few reads."""
    time.sleep(seconds)
    return max(worker.rss() for _ in range(3))


def _probe_latency(stack: Stack, producer: Any, count: int) -> list[float]:
    """Enqueue → submitted upstream (``in_queue`` or later) seconds of ``count`` jobs."""
    started = {producer.enqueue(job_request(n=i)).id: time.time() for i in range(count)}
    done: dict[str, float] = {}

    def finished() -> bool:
        for job_id in started.keys() - done.keys():
            record = producer.get(job_id)
            if record.status not in (JobStatus.QUEUED, JobStatus.SUBMITTING):
                done[job_id] = time.time()
        return len(done) == count

    wait_until(finished, 60, "probe jobs to be submitted", interval_s=0.02)
    return [done[j] - started[j] for j in started]


def held_polls(stack: Stack, n: int, naive_tasks: int) -> dict[str, Any]:
    """RSS growth and probe latency with ``n`` jobs in flight, each holding a countdown poll.

    The naive worker runs meanwhile on Redis database 1 (it is idle but for 8 sleeping
    threads polling twice a second): how many generations it holds is read at the end."""
    stack.redis.flushall()
    stack.emulator.update_config(queue_s=0, run_s=3600, capacity=1_000_000, output_min_bytes=0)
    producer = stack.producer(0, **HELD)
    worker = Worker(stack.env(0, **HELD), name="inflight")
    naive_app = stack.producer(1).app
    naive_redis = redis.Redis.from_url(stack.redis_url(1))
    naive = Worker(stack.env(1), app_module="bench.baseline_app", queues=QUEUE_SUBMIT, name="naive")
    try:
        start_all([worker, naive])
        _probe_latency(stack, producer, PROBES)  # warm every code path, thread and connection
        idle_probe = _probe_latency(stack, producer, PROBES)
        rss_idle = _settle_rss(worker)
        naive_rss_idle = naive.rss()
        for i in range(naive_tasks):
            naive_app.send_task("bench.naive_poll", args=[f"naive {i}", 0.5, 300.0])
        already = stack.emulator.counters()["submits"]
        redis_before = int(stack.redis.info("memory")["used_memory"])
        started = time.monotonic()
        for i in range(n):
            producer.enqueue(job_request(n=i))
        enqueue_s = time.monotonic() - started
        wait_until(
            lambda: (
                stack.emulator.counters()["submits"] >= already + n
                and int(stack.redis.zcard(DUE_KEY)) >= n
            ),
            max(60.0, n / 40),
            "jobs to be submitted and waiting",
            0.2,
        )
        held_in_workers = unacked(stack.redis)
        redis_per_job = (int(stack.redis.info("memory")["used_memory"]) - redis_before) / n
        held_s = time.monotonic() - started
        rss_held = _settle_rss(worker)
        naive_held = int(naive_redis.scard(NAIVE_ACTIVE_KEY))
        naive_queued = int(naive_redis.llen(QUEUE_SUBMIT))
        naive_rss = naive.rss()
        naive.kill()  # its tasks sleep for minutes: a warm shutdown would wait for them
        loaded_probe = _probe_latency(stack, producer, PROBES)
        alive = worker.alive()
    finally:
        naive.kill()
        naive.close()
        naive_app.close_runtime()
        naive_redis.flushdb()
        naive_redis.close()
        worker.kill()  # N held polls would be restored to a queue that is flushed next anyway
        worker.close()
        producer.app.close_runtime()
        stack.emulator.update_config(run_s=0)
    growth = rss_held - rss_idle
    return {
        "jobs": n,
        "worker_alive": alive,
        "countdowns_held_by_workers": held_in_workers,
        "redis_bytes_per_job": redis_per_job,
        "enqueue_s": enqueue_s,
        "all_held_after_s": held_s,
        "submits_per_s": n / held_s,
        "rss_idle_mb": rss_idle / MIB,
        "rss_held_mb": rss_held / MIB,
        "rss_growth_mb": growth / MIB,
        "rss_growth_per_1000_mb": growth / MIB / n * 1000,
        "probe_idle_median_s": statistics.median(idle_probe),
        "probe_loaded_median_s": statistics.median(loaded_probe),
        "probe_loaded_max_s": max(loaded_probe),
        "naive": {
            "tasks": naive_tasks,
            "in_flight": naive_held,
            "still_queued": naive_queued,
            "rss_idle_mb": naive_rss_idle / MIB,
            "rss_growth_mb": (naive_rss - naive_rss_idle) / MIB,
        },
    }


def run(stack: Stack, quick: bool) -> list[Row]:
    """In-flight capacity vs the naive worker; RSS per 1,000; submit latency under load."""
    n = 600 if quick else TARGET_JOBS
    held = held_polls(stack, n, naive_tasks=24)
    naive = held["naive"]
    per_1000 = held["rss_growth_per_1000_mb"]
    projected = per_1000 * TARGET_JOBS / 1000
    fits = int(RSS_BUDGET_MB / per_1000 * 1000) if per_1000 > 0 else None
    measured_all = n >= TARGET_JOBS
    growth_for_target = held["rss_growth_mb"] if measured_all else projected
    ok = held["worker_alive"] and growth_for_target <= RSS_BUDGET_MB
    how = (
        f"{n:,} measured"
        if measured_all
        else f"{n:,} measured, 10,000 projected from the per-1,000 growth (quick mode)"
    )
    return [
        Row(
            "in flight per worker process (waiting jobs)",
            n,
            "jobs",
            baseline=naive["in_flight"],
            target="≥ 10,000 with ≤ 200 MB RSS growth",
            passed=ok,
            note=(
                f"{how}; RSS +{held['rss_growth_mb']:.0f} MB "
                f"(10,000 → {projected:.0f} MB); long waits parked in Redis "
                f"({held['redis_bytes_per_job'] / 1024:.1f} KiB per job, "
                f"{held['countdowns_held_by_workers']} countdowns held by the worker); "
                f"baseline = naive sleep-in-task worker, threads -c 8"
            ),
            details={"service": held, "memory_limit_jobs": fits},
        ),
        Row(
            "in flight: RSS growth per 1,000 waiting jobs",
            per_1000,
            "MB",
            target="≤ 20 MB (200 MB / 10,000)",
            passed=per_1000 <= RSS_BUDGET_MB / TARGET_JOBS * 1000,
            note=f"idle {held['rss_idle_mb']:.0f} MB → {held['rss_held_mb']:.0f} MB with {n:,}",
        ),
        Row(
            f"in flight: new-job submit latency with {n:,} held (median)",
            held["probe_loaded_median_s"],
            "s",
            baseline=held["probe_idle_median_s"],
            target="report (baseline = same worker idle)",
            passed=None,
            note=f"{PROBES} jobs enqueue→submitted upstream; max {held['probe_loaded_max_s']:.2f}s",
        ),
    ]
