"""End-to-end throughput, pool choice and Redis round trips per job.

* Service: zero-latency emulator (queue_s = run_s = 0), one 1024x1024 PNG per job, a real
  webhook receiver. Jobs/s from the first ``Producer.enqueue`` to the last webhook received.
  Every job is exactly four tasks: submit → poll (finds it completed) → archive → notify.
* Floor: ``bench.hop`` chains of four countdown-0 hops over the same queues, same pool, same
  Redis (database 1), same Celery configuration, no I/O (bench/baseline_app.py). Both workers
  are up at once and take turns (SIGSTOP/SIGCONT): batches of jobs, alternately service and
  chain, so both see the same machine.
* Pools: ``-P prefork -c 2`` against ``-P threads -c 8`` (gevent/eventlet are not installed),
  at zero latency (CPU-bound: two processes use both cores) and with 50 ms added to every
  upstream answer (I/O-bound, as in production: only 2 tasks can wait at once under prefork).
* Poll capacity: a threads worker whose jobs are all an hour long and poll as often as they
  may: status checks/s, so ``x 30 s`` is how many jobs it keeps on a 30 s poll schedule.
  Floor: as many ``bench.poll_floor`` chains (one status GET, then the next check at once,
  bench/baseline_app.py) on a bare-chain worker (same pool, same concurrency, same emulator,
  its own Redis database). Both workers are up at once and take turns (SIGSTOP/SIGCONT):
  short windows, alternately service and floor, so both see the same machine (the shared
  cores' speed drifts by 20 % between runs). Both counted by the emulator's status calls.
* Round trips: redis-py's connection wrapped in the producer (this process) and in the worker
  (bench/_inject/sitecustomize.py) in a threads run of their own (the wrapper costs CPU, so
  the timed runs go without it); per job, by command name.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from api_contracts.messages import QUEUE_POLL
from bench import redis_counter
from bench.common import (
    CHAIN_DONE_KEY,
    TOKEN,
    BenchError,
    Row,
    Stack,
    Worker,
    job_request,
    queue_lengths,
    start_all,
    unacked,
    wait_until,
)
from worker.devtools.emulator import FaultRule
from worker.settings import DEFAULT_MODEL_ID

HOPS_PER_JOB = 4
WARMUP_JOBS = 8
UPSTREAM_LATENCY_S = 0.05
#: POLL_MAX_INTERVAL_S of a long-running job: each one costs 1/30 of a status check per second.
POLL_CAP_S = 30.0


#: An hour-long generation: the poll-capacity figures' requests never finish while measured.
LONG_RUN_S = 3600.0

#: Settings for a zero-latency run: poll at once, retry webhooks quickly. The poll interval
#: stays at 0.05 s (max = min), so hour-long jobs poll as often as POLL_MIN_INTERVAL_S allows
#: (zero-latency jobs are done at their first check either way).
FAST = {
    "POLL_INITIAL_DELAY_S": "0",
    "POLL_MIN_INTERVAL_S": "0.05",
    "POLL_MAX_INTERVAL_S": "0.05",
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
) -> list[dict[str, Any]]:
    """Jobs/s of the real pipeline with one worker process, one result per ``(jobs,
    upstream latency s)`` phase. The latency delays every emulator answer (submit, status,
    result, download) without using CPU; it is set on the emulator, so one worker serves
    every phase. Round trips are counted in the first phase only."""
    stack.redis.flushall()
    stack.emulator.update_config(queue_s=0, run_s=0, capacity=100_000, output_min_bytes=0)
    count_file = tempfile.mktemp(prefix="bench-redis-count-")
    extra = {"BENCH_REDIS_COUNT_FILE": count_file} if count_redis else {}
    producer = stack.producer(0, **FAST)
    worker = Worker(stack.env(0, **FAST, **extra), pool=pool, concurrency=concurrency, name=pool)
    results: list[dict[str, Any]] = []
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
    finally:
        stack.emulator.set_faults([])
        stack.emulator.update_config(run_s=0)
        worker.close()
        producer.app.close_runtime()
        for leftover in _dumps(count_file):
            os.unlink(leftover)
    return results


def poll_capacity(
    stack: Stack, jobs: int, rounds: int, window_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Status checks/s of the service and of its floor, measured in turns.

    The service worker's ``jobs`` generations (an hour long) poll as often as
    ``POLL_MIN_INTERVAL_S`` allows, so it has a backlog and runs checks flat out; the floor
    worker (``bench.baseline_app``, Redis database 1) polls as many hour-long requests with
    ``bench.poll_floor`` chains. Both are started, then stopped (SIGSTOP); each of ``rounds``
    resumes one, lets it settle, counts for ``window_s``, stops it, then the other (the
    order alternates). Returns (service, floor), each summed over its windows."""
    stack.redis.flushall()
    stack.emulator.set_faults([])
    stack.emulator.update_config(queue_s=0, run_s=LONG_RUN_S, capacity=100_000)
    service, floor = _worker_pair(stack, "poll")
    producer = stack.producer(0, **FAST)
    floor_app = stack.producer(1, **FAST).app
    try:
        start_all([service, floor])
        before = stack.emulator.counters()["submits"]
        for i in range(jobs):
            producer.enqueue(job_request(n=i))
        wait_until(
            lambda: stack.emulator.counters()["submits"] - before >= jobs, 60, "submits", 0.05
        )
        # The floor's chains stop on their own a little after the last window (the worker is
        # killed before then anyway).
        until = time.time() + rounds * 2 * (window_s + SETTLE_S) + 30.0
        _start_floor_chains(stack, floor_app, jobs, until)
        time.sleep(SETTLE_S)  # let every chain start, and the service's backlog form
        windows = _in_turns(
            {"service": service, "floor": floor},
            rounds,
            lambda _name, worker: _count_status_calls(stack, worker, window_s),
        )
    finally:
        for worker in (service, floor):
            _resume(worker)
            worker.kill()  # thousands of due polls: nothing worth a warm shutdown
            worker.close()
        stack.emulator.update_config(run_s=0)
        producer.app.close_runtime()
        floor_app.close_runtime()
    ratios = [
        s["status_calls"] / f["status_calls"] if f["status_calls"] else 0.0
        for s, f in zip(windows["service"], windows["floor"], strict=True)
    ]
    return _windows_total(windows["service"], jobs, ratios), _windows_total(
        windows["floor"], jobs, ratios
    )


#: After a worker resumes: its in-flight answers land and it is back at full speed.
SETTLE_S = 0.3


def _in_turns(
    workers: dict[str, Worker], rounds: int, measure: Callable[[str, Worker], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Stop every worker (SIGSTOP), then ``rounds`` times resume each in turn (the order
    alternates), let it settle, ``measure`` it and stop it again: each one's measurements."""
    for worker in workers.values():
        _pause(worker)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    order = list(workers.items())
    for turn in range(rounds):
        for name, worker in order if turn % 2 == 0 else order[::-1]:
            _resume(worker)
            time.sleep(SETTLE_S)
            measured[name].append(measure(name, worker))
            _pause(worker)
    return measured


def _worker_pair(stack: Stack, label: str) -> tuple[Worker, Worker]:
    """The service's threads worker (Redis database 0) and the baseline app's, with the same
    pool, concurrency and settings, on database 1 (their queues have the same names)."""
    from api_contracts.messages import ALL_QUEUES

    service = Worker(stack.env(0, **FAST), pool="threads", concurrency=8, name=f"{label}-service")
    baseline = Worker(
        stack.env(1, **FAST),
        pool="threads",
        concurrency=8,
        app_module="bench.baseline_app",
        queues=",".join(ALL_QUEUES),
        name=f"{label}-baseline",
    )
    return service, baseline


def _pause(worker: Worker) -> None:
    os.killpg(worker.pid, signal.SIGSTOP)


def _resume(worker: Worker) -> None:
    if worker.alive():
        os.killpg(worker.pid, signal.SIGCONT)


def _start_floor_chains(stack: Stack, app: Any, jobs: int, until: float) -> None:
    """``jobs`` hour-long requests submitted straight to the emulator, each polled by a
    ``bench.poll_floor`` chain (one GET, then the next at once)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    path = f"/v1/models/{DEFAULT_MODEL_ID}"
    with httpx.Client(base_url=stack.emulator.base_url, headers=headers, timeout=10) as client:
        answers = [client.post(path, json=job_request(n=i)["input"]) for i in range(jobs)]
    ids = [answer.raise_for_status().json()["request_id"] for answer in answers]
    for request_id in ids:
        app.send_task(
            "bench.poll_floor", args=[request_id, until], queue=QUEUE_POLL, routing_key=QUEUE_POLL
        )


def _count_status_calls(stack: Stack, worker: Worker, seconds: float) -> dict[str, Any]:
    """Status calls the emulator answers over ``seconds``, and the worker's CPU meanwhile."""
    cpu_before = stack.cpu_seconds(worker)["worker"]
    calls_before = stack.emulator.counters()["status_calls"]
    started = time.monotonic()
    time.sleep(seconds)
    calls = stack.emulator.counters()["status_calls"] - calls_before
    elapsed = time.monotonic() - started
    cpu = stack.cpu_seconds(worker)["worker"] - cpu_before
    return {"seconds": elapsed, "status_calls": calls, "cpu_s": cpu}


def _windows_total(windows: list[dict[str, Any]], jobs: int, ratios: list[float]) -> dict[str, Any]:
    calls = sum(w["status_calls"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    cpu = sum(w["cpu_s"] for w in windows)
    return {
        "jobs": jobs,
        "windows": len(windows),
        "seconds": round(seconds, 2),
        "status_calls": calls,
        "polls_per_s": calls / seconds if seconds else 0.0,
        "worker_cpu_us_per_check": round(cpu * 1e6 / calls, 1) if calls else None,
        "per_window_polls_per_s": [round(w["status_calls"] / w["seconds"], 1) for w in windows],
        "per_round_ratio": [round(r, 3) for r in ratios],
    }


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


def end_to_end(stack: Stack, jobs: int, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Jobs/s of the service and of the bare chain, in turns.

    Both workers are started (the chain's on Redis database 1), warmed up and stopped
    (SIGSTOP); each of ``rounds`` resumes one, runs ``jobs`` jobs (the service: first enqueue
    to last webhook, then until it is idle; the chain: first publish to last ``INCR``), stops
    it, then the other (the order alternates). Returns (service, chain) over all rounds."""
    from api_contracts.messages import ALL_QUEUES

    stack.redis.flushall()
    stack.emulator.set_faults([])
    stack.emulator.update_config(queue_s=0, run_s=0, capacity=100_000, output_min_bytes=0)
    service, chain = _worker_pair(stack, "e2e")
    producer = stack.producer(0, **FAST)
    chain_app = stack.producer(1, **FAST).app
    chain_redis = redis.Redis.from_url(stack.redis_url(1))
    published = [0]

    def run_service(n: int) -> float:
        seconds, _ = _run_jobs(stack, producer, n, timeout_s=max(60.0, n / 2))
        wait_until(lambda: _idle(stack), 10, "worker to go idle")
        return seconds

    def run_chains(n: int) -> float:
        first, offset = ALL_QUEUES[0], published[0]
        published[0] += n
        started = time.time()
        for i in range(n):
            chain_app.send_task("bench.hop", args=[offset + i, 1], queue=first, routing_key=first)
        wait_until(
            lambda: int(chain_redis.get(CHAIN_DONE_KEY) or 0) >= published[0],
            max(60.0, n / 5),
            "bare chains",
            interval_s=0.005,
        )
        return time.time() - started

    runs = {"service": run_service, "chain": run_chains}

    def timed_batch(name: str, worker: Worker) -> dict[str, float]:
        cpu_before = stack.cpu_seconds(worker)
        seconds = runs[name](jobs)
        return {"seconds": seconds, **_cpu_ms_per_job(stack.cpu_seconds(worker), cpu_before, jobs)}

    try:
        start_all([service, chain])
        run_service(WARMUP_JOBS)
        run_chains(WARMUP_JOBS)
        batches = _in_turns({"service": service, "chain": chain}, rounds, timed_batch)
    finally:
        for worker in (service, chain):
            _resume(worker)
            worker.close()
        producer.app.close_runtime()
        chain_app.close_runtime()
        chain_redis.close()
    ratios = [
        c["seconds"] / s["seconds"]
        for s, c in zip(batches["service"], batches["chain"], strict=True)
    ]
    return _batches_total(batches["service"], jobs, ratios), _batches_total(
        batches["chain"], jobs, ratios
    )


def _batches_total(batches: list[dict[str, Any]], jobs: int, ratios: list[float]) -> dict[str, Any]:
    seconds = sum(b["seconds"] for b in batches)
    total = jobs * len(batches)
    cpu = {
        name: round(sum(b[name] for b in batches) / len(batches), 2)
        for name in batches[0]
        if name != "seconds"
    }
    return {
        "jobs": total,
        "rounds": len(batches),
        "seconds": round(seconds, 3),
        "jobs_per_s": total / seconds,
        "tasks_per_s": total * HOPS_PER_JOB / seconds,
        "cpu_ms_per_job": cpu,
        "per_round_jobs_per_s": [round(jobs / b["seconds"], 1) for b in batches],
        "per_round_ratio": [round(r, 3) for r in ratios],
    }


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
    n = 100 if quick else 400
    n_slow = 16 if quick else 120
    slow = UPSTREAM_LATENCY_S
    # (jobs, rounds, window s): each worker counts rounds x window s in all.
    poll_turns = (100, 5, 1.0) if quick else (400, 10, 2.0)
    # (jobs, rounds): each side runs jobs x rounds.
    e2e_turns = (40, 3) if quick else (100, 4)
    # Round trips are counted on a worker of their own: the counting wrapper costs CPU on
    # every command, and the timed worker must run exactly as the bare chain's does.
    (counted,) = service_throughput(
        stack, [(n, 0.0)], pool="threads", concurrency=8, count_redis=True
    )
    e2e, bare = end_to_end(stack, *e2e_turns)
    # Quick mode skips the pools at zero latency: the I/O-bound case is the one that decides.
    threads_phases = [(n_slow, slow)] if quick else [(n, 0.0), (n_slow, slow)]
    threads = service_throughput(stack, threads_phases, pool="threads", concurrency=8)
    capacity, floor = poll_capacity(stack, *poll_turns)
    prefork = service_throughput(stack, threads_phases, pool="prefork", concurrency=2)
    ratio = e2e["jobs_per_s"] / bare["jobs_per_s"]
    cpu = e2e["cpu_ms_per_job"]
    e2e_ratios = e2e["per_round_ratio"] or [0.0]
    rows = [
        Row(
            "throughput: jobs/s submit→webhook (threads -c 8)",
            e2e["jobs_per_s"],
            "jobs/s",
            baseline=bare["jobs_per_s"],
            target="≥ 0.5 of bare chain",
            passed=ratio >= 0.5,
            note=(
                f"{e2e['jobs']} jobs, zero-latency emulator; baseline = 4-hop countdown-0 "
                f"chain, no I/O, same pool; in turns, {e2e['rounds']} rounds each, per-round "
                f"ratio {min(e2e_ratios):.2f}–{max(e2e_ratios):.2f}; worker CPU "
                f"{cpu['worker']:.0f} ms/job vs {bare['cpu_ms_per_job']['worker']:.0f} for "
                "the chain"
            ),
            details={"service": e2e, "bare_chain": bare},
        )
    ]
    if not quick:
        rows.append(_pool_row("zero latency", prefork[0], threads[0]))
    rows.append(_pool_row("50 ms upstream latency", prefork[-1], threads[-1]))
    worker = per_job(counted["worker_redis"], n)
    producer = per_job(counted["producer_redis"], n)
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
    poll_ratio = capacity["polls_per_s"] / floor["polls_per_s"] if floor["polls_per_s"] else 0
    ratios = capacity["per_round_ratio"] or [0.0]
    rows.append(
        Row(
            "poll capacity vs floor (threads -c 8)",
            capacity["polls_per_s"],
            "checks/s",
            baseline=floor["polls_per_s"],
            target="≥ 0.7 of floor",
            passed=poll_ratio >= 0.7,
            note=(
                f"{capacity['jobs']} hour-long jobs polling back to back vs as many "
                "bench.poll_floor chains (one status GET, then the next at once), same pool, "
                f"in turns: {capacity['windows']} windows each, {capacity['seconds']:.0f} s "
                f"in all; per-round ratio {min(ratios):.2f}–{max(ratios):.2f}; worker CPU "
                f"{_us(capacity['worker_cpu_us_per_check'])} µs/check vs "
                f"{_us(floor['worker_cpu_us_per_check'])} for the floor"
            ),
            details={"service": capacity, "floor": floor},
        )
    )
    rows.append(
        Row(
            "poll capacity → jobs kept on a 30 s poll schedule",
            capacity["polls_per_s"] * POLL_CAP_S,
            "jobs",
            target="report (checks/s × 30 s, one process)",
            passed=None,
            note=(
                f"{capacity['polls_per_s']:.0f} status checks/s per process (threads -c 8, "
                "2 shared cores); add processes for more"
            ),
            details=capacity,
        )
    )
    return rows


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.endswith("_redis")}
