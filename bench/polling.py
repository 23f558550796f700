"""Status calls per job and detection delay: the learned schedule against the 10 % rule.

**Real run** (one emulator, same run): two service workers side by side on two Redis
databases, one with ``POLL_LEARN=false`` (the 10 % rule: first check after 1 s, then ~10 %
of the elapsed time between 1 s and 30 s) and one with the defaults (learning). Generations
run lognormal times (emulator ``run_sigma``): median 25 s, σ 0.3 (quick: median 5 s). Jobs
arrive at a steady rate. First a warm-up of 200 jobs per worker (quick: 100) that the
learning worker learns from, then the measured jobs. Two kinds of upstream queue:

* **shared** (the target's row): each request waits in upstream's queue 0.2 s plus an
  exponential wait of mean 5 s (emulator ``queue_extra_s``; quick: 1 s), as behind other
  customers' requests; the same waits as the simulated rows;
* **overloaded** (full run only, reported): the emulator runs fewer at once than arrive
  (capacity 0.8 × rate × median), so the queue, and every wait, grows through each phase.
  The learned run times lag behind (a job never seen ``in_queue`` teaches its queue wait as
  run time), so this is the hard case, not the steady one.

* calls per job: the emulator's per-request status counter;
* detection delay: the moment the job's ``archiving`` event is published (pub/sub) minus the
  moment the emulator finished it (its own timeline, same monotonic clock), held against the
  job's bound ``max(1 s, 10 % of T)``, T = queue wait + run time since upstream accepted it.

**Simulated**: the production schedule functions (``decisions.follow_schedule``, the ones the
poll step calls, learning from their own samples like the worker does) on 3,000 jobs after a
200-job warm-up, lognormal σ 0.3 with medians of 25 s, 2 min and 10 min and exponential queue
waits (mean 5 s); the same jobs on the 10 % rule.

Target (issue 14): calls per job ≤ 1/3 of the 10 % rule's, at p95 of delay/bound ≤ 1.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import redis

from bench.common import BenchError, Row, Stack, Worker, close_all, start_all, wait_until
from worker.constants import EVENTS_CHANNEL_PREFIX
from worker.jobs import decisions
from worker.jobs.runtimes import Learned, MemoryRuntimes, read, teach
from worker.settings import PollSettings

SIGMA = 0.3
TARGET_RATIO = 1 / 3
RULE = {"POLL_LEARN": "false"}
SIMULATED_QUEUE_MEAN_S = 5.0


def delay_bound(total_s: float) -> float:
    """Target: detection delay ≤ max(1 s, 10 % of T)."""
    return max(1.0, 0.1 * total_s)


def _summary(calls: list[int], delays: list[float], totals: list[float]) -> dict[str, Any]:
    ratios = sorted(d / delay_bound(t) for d, t in zip(delays, totals, strict=True))
    return {
        "jobs": len(calls),
        "calls_mean": sum(calls) / len(calls),
        "calls_median": sorted(calls)[len(calls) // 2],
        "delay_p95_s": sorted(delays)[int(0.95 * (len(delays) - 1))],
        "delay_of_bound_p95": ratios[int(0.95 * (len(ratios) - 1))],
        "late_share": sum(r > 1 for r in ratios) / len(ratios),
        "total_median_s": sorted(totals)[len(totals) // 2],
    }


# ---------------------------------------------------------------------------- simulation


def simulate(median_s: float, jobs: int, warmup: int, seed: int) -> dict[str, Any]:
    """Learned schedule and 10 % rule on the same lognormal jobs (see module doc)."""
    rng = random.Random(seed)
    poll = PollSettings()
    book = MemoryRuntimes(window=poll.learn_window)
    learned: tuple[list[int], list[float], list[float]] = ([], [], [])
    rule: tuple[list[int], list[float], list[float]] = ([], [], [])
    for i in range(warmup + jobs):
        runtime = median_s * math.exp(SIGMA * rng.gauss(0.0, 1.0))
        queue = rng.expovariate(1 / SIMULATED_QUEUE_MEAN_S)
        run = decisions.follow_schedule(runtime, queue, read(book, "k"), poll, rng.random)
        teach(book, "k", run.samples)
        if i < warmup:
            continue
        base = decisions.follow_schedule(runtime, queue, Learned(), poll, rng.random)
        for (calls, delays, totals), r in ((learned, run), (rule, base)):
            calls.append(r.calls)
            delays.append(r.delay_s)
            totals.append(queue + runtime)
    return {"learned": _summary(*learned), "rule": _summary(*rule)}


# ---------------------------------------------------------------------------- real run


class _Detections:
    """Monotonic time of each job's first ``archiving`` event, from Redis pub/sub."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.psubscribe(EVENTS_CHANNEL_PREFIX + "*")
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-detections", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is None or message.get("data") != b"archiving":
                continue
            job_id = message["channel"].decode().removeprefix(EVENTS_CHANNEL_PREFIX)
            self.seen.setdefault(job_id, time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


def _request(n: int) -> dict[str, Any]:
    return {"input": {"prompt": f"bench poll {n}", "size": "1024x1024", "force_single": True}}


def real_run(
    stack: Stack,
    *,
    median_s: float,
    warmup: int,
    jobs: int,
    rate_per_s: float,
    overloaded: bool = False,
) -> dict[str, Any]:
    """Both schedules side by side on the same emulator (see module doc)."""
    stack.redis.flushall()
    if overloaded:
        # Fewer run at once than the arrivals offer (rate × median): upstream queues grow.
        capacity, queue_extra_s = max(4, int(0.8 * rate_per_s * median_s)), 0.0
    else:
        capacity, queue_extra_s = 100_000, median_s / 5
    stack.emulator.update_config(
        queue_s=0.2,
        queue_extra_s=queue_extra_s,
        run_s=median_s,
        run_sigma=SIGMA,
        capacity=capacity,
        output_min_bytes=0,
    )
    schedules = {"learned": (0, {}), "rule": (1, RULE)}
    producers = {name: stack.producer(db, **extra) for name, (db, extra) in schedules.items()}
    workers = {
        name: Worker(stack.env(db, **extra), name=f"poll-{name}", concurrency=8)
        for name, (db, extra) in schedules.items()
    }
    watcher = _Detections(stack.redis_url())
    ids: dict[str, list[str]] = {name: [] for name in schedules}
    try:
        start_all(list(workers.values()))
        for phase, count in (("warmup", warmup), ("measured", jobs)):
            started = len(ids["learned"])
            for n in range(count):
                for name, producer in producers.items():
                    ids[name].append(producer.enqueue(_request(n)).id)
                time.sleep(1 / rate_per_s * len(producers))
            wait_until(
                lambda: all(j in watcher.seen for js in ids.values() for j in js),
                median_s * 6 + count / rate_per_s + 60,
                f"every {phase} job to be detected",
                interval_s=0.2,
            )
            if phase == "warmup":
                marks = dict.fromkeys(ids, started + count)
        by_request = stack.emulator.counters()["status_calls_by_request"]
        timelines = stack.emulator.emulator.timelines()
        results: dict[str, Any] = {
            "capacity": capacity,
            "queue_extra_s": queue_extra_s,
            "rate_per_s": rate_per_s,
        }
        for name, producer in producers.items():
            calls, delays, totals = [], [], []
            for job_id in ids[name][marks[name] :]:
                record = producer.get(job_id)
                if record.request_id is None or record.request_id not in timelines:
                    raise BenchError(f"job {job_id} has no upstream request: {record.status}")
                submitted, _, ended = timelines[record.request_id]
                if ended is None:
                    raise BenchError(f"request of job {job_id} never ended upstream")
                calls.append(int(by_request.get(record.request_id, 0)))
                delays.append(max(0.0, watcher.seen[job_id] - ended))
                totals.append(ended - submitted)
            results[name] = _summary(calls, delays, totals)
    finally:
        watcher.close()
        close_all(list(workers.values()))
        for producer in producers.values():
            producer.app.close_runtime()
        stack.emulator.update_config(
            run_sigma=0.0, run_s=0, capacity=100_000, queue_s=0, queue_extra_s=0.0
        )
    return results


# ---------------------------------------------------------------------------- rows


def _rows(label: str, how: str, result: dict[str, Any], *, unheld: str | None = None) -> list[Row]:
    """Calls and delay rows; ``unheld``: why the ≤ 1/3 target does not apply (short
    generations, where the rule's 1 s floor, not its 10 %, sets the calls; a queue with no
    steady state), None where it does."""
    held = unheld is None
    ours, rule = result["learned"], result["rule"]
    ratio = ours["calls_mean"] / rule["calls_mean"]
    within = ours["delay_of_bound_p95"] <= 1.0
    return [
        Row(
            f"status calls per job, {label} ({how})",
            ours["calls_mean"],
            "calls",
            baseline=rule["calls_mean"],
            target=("≤ 1/3 of the 10 % rule, p95 delay within bound" if unheld is None else unheld),
            passed=(ratio <= TARGET_RATIO and within) if held else None,
            note=(
                "baseline = the 10 % rule (POLL_LEARN=false) on the same jobs; p95 delay/bound "
                f"{ours['delay_of_bound_p95']:.2f} (rule {rule['delay_of_bound_p95']:.2f})"
            ),
            details=result,
        ),
        Row(
            f"detection delay p95 / max(1 s, 10 % T), {label} ({how})",
            ours["delay_of_bound_p95"],
            "×",
            baseline=rule["delay_of_bound_p95"],
            target="≤ 1",
            passed=within,
            note=(
                f"p95 delay {ours['delay_p95_s']:.2f} s (rule {rule['delay_p95_s']:.2f} s); "
                f"{ours['late_share']:.1%} of jobs past their bound (rule {rule['late_share']:.1%})"
            ),
            details=result,
        ),
    ]


def run(stack: Stack, quick: bool) -> list[Row]:
    """Real lognormal generations (25 s median; quick: 5 s), simulated 25 s, 2 min, 10 min."""
    median = 5.0 if quick else 25.0
    label = f"lognormal median {median:g} s σ {SIGMA}"

    def real(overloaded: bool) -> dict[str, Any]:
        return real_run(
            stack,
            median_s=median,
            warmup=100 if quick else 200,
            jobs=100 if quick else 400,
            rate_per_s=16.0 if quick else 10.0,
            overloaded=overloaded,
        )

    short = "report (the 1/3 target is for the 25 s median: full run)"
    rows = _rows(f"{label}, shared queue", "real", real(False), unheld=short if quick else None)
    if not quick:
        rows += _rows(
            f"{label}, overloaded upstream",
            "real",
            real(True),
            unheld="report (queue waits grow through the run: no steady state to learn)",
        )
    for median_s in (25.0, 120.0, 600.0):
        label = f"lognormal median {_label(median_s)} σ {SIGMA}"
        rows += _rows(label, "simulated", simulate(median_s, 3000, 200, seed=int(median_s)))
    return rows


def _label(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate-only", action="store_true")
    args = parser.parse_args()
    if args.simulate_only:
        for m in (25.0, 120.0, 600.0):
            print(m, json.dumps(simulate(m, 3000, 200, seed=int(m)), indent=1))
