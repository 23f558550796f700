"""``fleet``: 100,000 jobs in flight on one Redis across 10 worker processes.

Every generation runs for hours in the emulator (``run_s`` 4 h, no queue, capacity 1,000,000,
no account limits), so nothing finishes: the fleet only holds the jobs and checks their status.
``python -m bench.fleet [--jobs N] [--workers W] [--max-interval S] [--window S]`` runs it alone
(``--quick``: the CI size; ``--submit``: the jobs submitted through the workers; ``--help``:
every knob); ``python -m bench`` runs it as the figure ``fleet``. The full run takes about 5
minutes on 2 cores (seeding 100,000 in about a minute, a wait planned before the workers
start, the 2-minute window); quick mode about a minute; ``--submit`` 20-30 minutes at full
size.

The schedule: ``POLL_MIN_INTERVAL_S`` = ``POLL_MAX_INTERVAL_S`` = I, so every check is planned
I apart (shortened by up to 10 % of jitter: a mean interval of 0.95 I) and the fleet must hold
``jobs / 0.95 I`` checks/s; I is the knob that makes that fit the machine (100,000 / 855 s ≈
117/s at the full run's 900 s). Waits over 60 s are parked in the due index (``rcw:due``) and
sent when due by the wake loop (``RECONCILE_WAKE_S``, passed only where the setting exists)
or, in code without one, by the reconciler's passes (``RECONCILE_INTERVAL_S``);
``RECONCILE_BATCH`` is raised to twice the checks due between two such passes. Quick mode
(I ≤ 60 s) takes the other path: countdowns held by the workers.

Seeded mode (the default): before the workers start, the bench puts every job in flight
directly (:func:`seed_jobs`): in the emulator, an upstream request already running for
``run_s`` (``Emulator.seed``); in the store, the job created (``create_many``) and written
with the service's own changes through the store's ``update`` and the ``Handoff``, pipelined
1,000 jobs at a time: the submit step's claim and its record of upstream's answer (request
id, ``in_queue``), then the poll step's change for a first check that saw it running
(``in_progress``, one status call), whose hand-off plans the next check. The i-th job's is
due at T + (i + ½)·0.95 I / N: evenly over one mean interval from T, the window's start, so
the fleet has its steady load from the first second, and every check in the window is an
ordinary one (status unchanged, a check-only write). T is planned before the workers start,
``seed_lead_s`` after seeding begins: seeding and starting the workers guessed on the slow
side (``SEED_RATE_GUESS``, ``START_GUESS_S``) plus ``--settle`` (10 s), and with parked waits
at least a minute after seeding, so that every seeded check is parked too (as the service
parks a wait over a minute: the wake pass sends it when its due time comes; a shorter one,
in quick mode, is published as a countdown). The bench waits for T once the workers are up;
up too late for a settle before T (``late_s`` in the details), the window starts a settle
period after they are.

``--submit``: jobs are created with ``Producer.enqueue_many`` (1,000 per call) before the
workers start, then submitted as fast as the workers and the emulator go (about 110/s at full
size on 2 cores, so 100,000 take longer than an interval; the emulator's submit walks every
request in flight: 0.8 ms each with 5,000 in flight, 4.7 ms with 20,000). Even load: with one
initial delay every job's checks would come in the shape of the submit burst, once per
interval. So worker ``i`` of W has ``POLL_INITIAL_DELAY_S`` = d + i·I/W: the jobs it submits
get their first check i/W of an interval later, the W stripes tile the interval, and jitter
smooths their edges (``--no-stagger``: one delay). The schedule is steady once the last
submitted job has had its first check (last submit + d + (W-1)/W·I) and the broker queues
have drained the checks held up behind the submits; the window starts then.

Measured over the window: status checks/s at the emulator vs planned, and the intervals each
job's consecutive checks actually came at (a gap far under I is a duplicate check); lateness
of checks against their planned time, p95, from the workers' histograms
``runcomfy_status_check_lateness_seconds`` (each worker's ``/metrics``, bucket deltas summed,
interpolated as Prometheus' ``histogram_quantile``), or, where no worker observes it, from the
emulator's side: a sample of jobs has its planned time (``outbox.due_at``) read from the store
at the window's start and the first status call for each after it is timed at the emulator
(one still missing at the end counts as later than the tail allowed); RSS per worker
(min/median/max); Redis ``used_memory`` per job in flight (minus the figure before any job);
CPU of the workers, Redis and the bench process (which hosts the emulator), the machine's busy
share and what other processes on it used.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import signal
import statistics
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import redis

from api_contracts.jobs import JobStatus
from api_contracts.messages import TASK_POLL
from bench.common import (
    MIB,
    BenchError,
    Row,
    Stack,
    Worker,
    close_all,
    cpu_seconds,
    job_request,
    percentile,
    queue_lengths,
    tree_cpu_seconds,
    unacked,
    wait_until,
)
from worker.constants import DUE_KEY
from worker.devtools.embedded import free_port
from worker.devtools.emulator import Emulator, Reply
from worker.jobs.handoff import PARK_AFTER_S, Handoff, Publisher
from worker.jobs.state import JobChange, Lease
from worker.jobs.steps.submit import LEASE_MARGIN_S
from worker.jobs.store import RedisJobStore
from worker.producer.producer import new_job_id, parse_request
from worker.queueing.publish import make_publisher
from worker.settings import Settings

LATENESS_METRIC = "runcomfy_status_check_lateness_seconds"
TARGET_P95_S = 1.0
#: Mean interval / POLL_MAX_INTERVAL_S: jitter shortens each interval by U(0, 10 %).
MEAN_INTERVAL_SHARE = 0.95
ENQUEUE_BATCH = 1000
#: Seeded mode: jobs written per pipeline.
SEED_BATCH = 1000
#: Seeded mode, to plan the first check before the workers start: a low guess of the
#: seeding rate (jobs/s; 1,800-2,100/s measured on 2 shared cores) and a high one of how
#: long W workers take to be ready (a fixed part and one per worker; 4 took 3 s). Too
#: cautious, the bench waits longer; too bold, the workers are not up a settle period
#: before the first check (``late_s``: the window then starts a settle period after they
#: are).
SEED_RATE_GUESS = 1000.0
START_GUESS_S = (5.0, 2.0)
#: The lease owner written by seeding's submit claim (as a worker's delivery id would be).
SEED_OWNER = "bench-fleet-seed"


@dataclass(frozen=True)
class Plan:
    """One run's size and settings."""

    jobs: int
    workers: int
    max_interval_s: float
    window_s: float
    concurrency: int = 3
    #: Emulated generation time: far longer than the run, nothing finishes.
    run_s: float = 4 * 3600.0
    #: POLL_INITIAL_DELAY_S of worker 0 (with ``stagger``, worker i adds i/W of an interval).
    first_check_s: float = 5.0
    #: Stagger the first checks by worker (not needed when submitting takes an interval).
    stagger: bool = True
    reconcile_interval_s: float = 15.0
    #: RECONCILE_WAKE_S, passed only if worker.settings has it.
    reconcile_wake_s: float = 0.5
    #: Jobs whose planned check time is read for the emulator-side lateness.
    sample: int = 2000
    #: Emulator side: only checks planned this long before the window's end count.
    tail_s: float = 30.0
    #: Seeded mode: the jobs are written in flight (upstream request running, next check
    #: planned) before the workers start, instead of being submitted through them.
    seeded: bool = True
    #: Seeded mode: the workers run at least this long before the window (the first check).
    settle_s: float = 10.0

    @property
    def mean_interval_s(self) -> float:
        """The mean interval between two checks of a job (jitter included)."""
        return MEAN_INTERVAL_SHARE * self.max_interval_s

    @property
    def planned_per_s(self) -> float:
        """Status checks per second the schedule plans for the whole fleet."""
        return self.jobs / self.mean_interval_s

    @property
    def parked(self) -> bool:
        """Are the waits parked in Redis (over 60 s) rather than held as countdowns?"""
        return self.max_interval_s > 60.0

    @property
    def reconcile_batch(self) -> int:
        """RECONCILE_BATCH: twice the checks falling due between two passes that send parked
        waits (wake passes where the code has them, else reconcile passes), 500 at least."""
        period = self.reconcile_wake_s if _has_wake_setting() else self.reconcile_interval_s
        return max(500, math.ceil(2 * self.planned_per_s * period))

    def initial_delay_s(self, worker: int) -> float:
        """POLL_INITIAL_DELAY_S of worker ``worker``: its stripe of the interval."""
        if not self.stagger:
            return self.first_check_s
        return self.first_check_s + worker * self.max_interval_s / self.workers

    @property
    def ramp_s(self) -> float:
        """From the last submit until every job has had its first check."""
        return self.initial_delay_s(self.workers - 1)

    @property
    def seed_lead_s(self) -> float:
        """Seeded mode: from the start of seeding to the first planned check (the window's
        start): seeding, starting the workers and settling, each guessed on the slow side.
        With parked waits, a minute at least after seeding: every seeded first check is then
        parked too (a wait up to a minute would be a countdown held by a worker)."""
        fixed, each = START_GUESS_S
        after_seeding = fixed + each * self.workers + self.settle_s
        if self.parked:
            after_seeding = max(after_seeding, PARK_AFTER_S + 1.0)
        return self.jobs / SEED_RATE_GUESS + after_seeding


FULL = Plan(jobs=100_000, workers=10, max_interval_s=900.0, window_s=120.0)
#: The CI size, about a minute: 175 checks/s on countdowns (I ≤ 60 s). With ``--submit``,
#: submitting 2,500 takes about one 15 s interval here, so the submit times spread the
#: checks (no stagger).
QUICK = Plan(
    jobs=2_500,
    workers=4,
    max_interval_s=15.0,
    window_s=30.0,
    first_check_s=1.0,
    stagger=False,
    sample=1000,
    tail_s=3.0,
)


def _has_wake_setting() -> bool:
    from worker.settings import ReconcileSettings

    return "wake_s" in ReconcileSettings.model_fields


def settings_env(plan: Plan) -> dict[str, str]:
    """Settings every worker (and the producer) shares."""
    env = {
        "POLL_MIN_INTERVAL_S": str(plan.max_interval_s),
        "POLL_MAX_INTERVAL_S": str(plan.max_interval_s),
        "JOB_DEADLINE_S": str(plan.run_s),
        # A burst of 100,000 takes minutes to submit: no resent submits for the late ones.
        "SUBMIT_GRACE_S": "3600",
        "RECONCILE_INTERVAL_S": str(plan.reconcile_interval_s),
        "RECONCILE_BATCH": str(plan.reconcile_batch),
    }
    if _has_wake_setting():
        env["RECONCILE_WAKE_S"] = str(plan.reconcile_wake_s)
    return env


def describe(plan: Plan) -> str:
    """The settings line printed before a run."""
    wake = (
        f"RECONCILE_WAKE_S={plan.reconcile_wake_s:g}"
        if _has_wake_setting()
        else "no RECONCILE_WAKE_S in this code"
    )
    path = "parked in rcw:due" if plan.parked else "countdowns held by workers"
    start = (
        f"seeded in flight, first checks due evenly over {plan.mean_interval_s:g}s from the "
        f"window's start"
        if plan.seeded
        else f"submitted by the workers, POLL_INITIAL_DELAY_S {plan.initial_delay_s(0):g}.."
        f"{plan.ramp_s:g} by worker"
    )
    return (
        f"fleet: {plan.jobs:,} jobs, {plan.workers} workers (threads -c {plan.concurrency}); "
        f"POLL_MAX_INTERVAL_S=POLL_MIN_INTERVAL_S={plan.max_interval_s:g} ({path}), "
        f"{start} → planned {plan.planned_per_s:,.0f} checks/s; RECONCILE_INTERVAL_S="
        f"{plan.reconcile_interval_s:g}, RECONCILE_BATCH={plan.reconcile_batch}, {wake}; "
        f"window {plan.window_s:g}s"
    )


# ---------------------------------------------------------------------------- /metrics
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of a worker's ``/metrics``: (name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: list[Samples], after: list[Samples], name: str) -> dict[str, float]:
    """Sum over workers of ``after - before`` for every sample called ``name``, keyed by its
    labels as ``k=v,…`` (one label only: by its value)."""
    out: dict[str, float] = defaultdict(float)
    for old, new in zip(before, after, strict=True):
        for (sample, labels), value in new.items():
            if sample == name:
                key = ",".join(v if len(labels) == 1 else f"{k}={v}" for k, v in labels)
                out[key] += value - old.get((sample, labels), 0.0)
    return dict(out)


def histogram_quantile(buckets: dict[str, float], q: float) -> tuple[float | None, bool]:
    """Prometheus' ``histogram_quantile`` over cumulative ``le`` → count; (value, capped):
    capped when the quantile falls in the +Inf bucket (value: the largest finite bound)."""
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None, False
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower, True
            if cumulative == below:
                return upper, False
            return lower + (upper - lower) * (rank - below) / (cumulative - below), False
        lower, below = upper, cumulative
    return lower, True


# ---------------------------------------------------------------------------- emulator side
class CallLog:
    """Counts the emulator's accepted submits and its status calls, and times each status
    call by request id while ``recording`` (cheaper than ``counters()``, which walks every
    request the emulator holds, under its lock)."""

    def __init__(self, emulator: Emulator) -> None:
        self.submits = 0
        self.status_calls = 0
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.recording = False
        self._emulator = emulator
        original = emulator.handle

        def handle(method: str, target: str, authorization: str | None, body: bytes) -> Reply:
            if target.endswith("/status"):
                self.status_calls += 1
                if self.recording:
                    self.calls[target.rsplit("/", 2)[-2]].append(time.time())
            reply = original(method, target, authorization, body)
            if target.startswith("/v1/models/") and reply.status == 200:
                self.submits += 1
            return reply

        # The server looks ``handle`` up on every call (its event loop is the only caller
        # of these endpoints, so the counts need no lock).
        emulator.__dict__["handle"] = handle

    def gaps(self) -> list[float]:
        """Seconds between consecutive recorded calls for the same request: the intervals
        the fleet held (a gap far under the planned interval is a duplicate check)."""
        return [
            b - a for times in self.calls.values() for a, b in itertools.pairwise(sorted(times))
        ]

    def remove(self) -> None:
        """Stop counting."""
        self.recording = False
        self._emulator.__dict__.pop("handle", None)


def planned_checks(store: Any, job_ids: list[str]) -> dict[str, float]:
    """request id → when the job's next status check is planned (store clock), for the jobs
    of ``store`` (a JobStore) whose next step is a status check."""
    planned: dict[str, float] = {}
    for job_id in job_ids:
        job = store.get(job_id)
        if job is None or job.outbox is None or job.outbox.task != TASK_POLL:
            continue
        if job.outbox.seq == job.seq and job.record.request_id:
            planned[job.record.request_id] = job.outbox.due_at
    return planned


def emulator_lateness(
    planned: dict[str, float], log: CallLog, start: float, end: float
) -> dict[str, Any]:
    """Lateness of the sampled checks planned in [start, end]: the first call at or after
    the planned time (1 s early allowed, for clock rounding) minus it; missing: inf."""
    late: list[float] = []
    for request_id, due in planned.items():
        if not start <= due <= end:
            continue
        calls = [t for t in log.calls.get(request_id, ()) if t >= due - 1.0]
        late.append(min(calls) - due if calls else math.inf)
    missing = sum(math.isinf(v) for v in late)
    if not late:
        return {"checks": 0, "missing": 0, "p50_s": None, "p95_s": None, "max_s": None}
    finite = [v for v in late if not math.isinf(v)]
    return {
        "checks": len(late),
        "missing": missing,
        "p50_s": percentile(late, 50),
        "p95_s": percentile(late, 95),
        "p99_s": percentile(late, 99),
        "max_s": max(finite) if finite else None,
        "mean_s": statistics.fmean(finite) if finite else None,
    }


# ---------------------------------------------------------------------------- CPU
def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


@dataclass
class Reading:
    """Everything read at one end of the window."""

    at: float
    status_calls: int
    metrics: list[Samples]
    worker_cpu: list[float]
    redis_cpu: float
    bench_cpu: float
    machine: tuple[int, int]


def read_all(log: CallLog, workers: list[Worker], ports: list[int], redis_pid: int) -> Reading:
    """One reading: emulator counter, every worker's /metrics, CPU times."""
    with ThreadPoolExecutor(len(ports)) as pool:
        metrics = list(pool.map(scrape, ports))
    return Reading(
        at=time.time(),
        status_calls=log.status_calls,
        metrics=metrics,
        worker_cpu=[tree_cpu_seconds(w.pid) for w in workers],
        redis_cpu=cpu_seconds(redis_pid),
        bench_cpu=cpu_seconds(os.getpid()),
        machine=machine_jiffies(),
    )


# ---------------------------------------------------------------------------- seeding
def _dropped(task: str, args: list[Any], kwargs: dict[str, Any], countdown: float) -> None:
    """Publisher of the submit's hand-off while seeding: the first check it promises (seq 1)
    is superseded at once by the seeded check's hand-off (seq 2), so it is never sent (sent,
    it would only be a stale message)."""


def seed_jobs(
    client: redis.Redis,
    settings: Settings,
    emulator: Emulator,
    publish: Publisher,
    *,
    jobs: int,
    first_due: float,
    span_s: float,
    run_s: float,
    batch: int = SEED_BATCH,
) -> list[str]:
    """Put ``jobs`` jobs in flight without submitting them through a worker; their ids, in
    the order their next checks are due.

    In the emulator, one request per job, already running for ``run_s``
    (:meth:`Emulator.seed`). In the store, each job is created (``create_many``) and then
    written with the service's own changes, through the store's ``update`` and the
    :class:`Handoff`: the submit step's claim (``submitting``, lease), its record of
    upstream's answer (``in_queue``, request id, a hand-off to the first check), then the
    poll step's change for a first check that saw the request running (``in_progress``,
    one status call, the check marks) with its hand-off to the next check, planned at
    ``first_due + (i + ½) · span_s / jobs`` for the i-th job (store clock): evenly over
    ``span_s``. That hand-off follows the service's rules: a wait over a minute is parked in
    the due index (pinned to exactly the planned time, as the wake pass compares), a shorter
    one is published through ``publish`` as a countdown. The writes of ``batch`` jobs go in
    one pipeline: the store's ``update`` on a pipelined client only queues its script and
    returns the job as it will be, and every queued write is checked once the pipeline ran.
    """

    def store_on(target: redis.Redis) -> RedisJobStore:
        return RedisJobStore(
            target,
            ttl_s=settings.job.ttl_s,
            deadline_s=settings.job.deadline_s,
            submit_grace_s=settings.submit.grace_s,
        )

    store = store_on(client)
    grace = settings.reconcile.grace_s
    lease_s = settings.runcomfy.call_budget_s + LEASE_MARGIN_S
    park_after = min(PARK_AFTER_S, settings.max_countdown_s)
    request_ids = [str(uuid.uuid4()) for _ in range(jobs)]
    emulator.seed(request_ids, run_s=run_s)
    ids: list[str] = []
    for first in range(0, jobs, batch):
        numbers = range(first, min(jobs, first + batch))
        born = store.create_many([(new_job_id(), parse_request(job_request(n=i))) for i in numbers])
        offset = store.now() - time.time()  # the store's clock, read once per batch
        with client.pipeline(transaction=False) as pipe:
            queued = store_on(pipe)
            limit = settings.max_countdown_s
            submits = Handoff(queued, _dropped, max_countdown_s=limit, grace_s=grace)
            checks = Handoff(queued, publish, max_countdown_s=limit, grace_s=grace)
            pins: set[int] = set()
            for i, job in zip(numbers, born, strict=True):
                if job is None:
                    raise BenchError("a new job id already existed")
                now = time.time() + offset
                claimed = queued.update(
                    replace(job, read_at=now),
                    JobChange(
                        status=JobStatus.SUBMITTING,
                        lease=Lease(SEED_OWNER, now + lease_s),
                        notes=list(job.record.notes),
                        due_in=lease_s + grace,
                    ),
                )
                assert claimed is not None  # queued: the pipeline's result is checked below
                recorded = submits.handoff(
                    claimed,
                    TASK_POLL,
                    countdown=settings.poll.initial_delay_s,
                    change=JobChange(
                        status=JobStatus.IN_QUEUE,
                        request_id=request_ids[i],
                        submitted_at=datetime.fromtimestamp(now, UTC),
                        lease=None,
                        attempt=0,
                        since=0.0,
                    ),
                )
                assert recorded is not None
                due = first_due + (i + 0.5) * span_s / jobs
                checks.handoff(
                    recorded,
                    TASK_POLL,
                    countdown=due - now,
                    change=JobChange(
                        checked_ts=now,
                        started_ts=now,
                        status=JobStatus.IN_PROGRESS,
                        queue_position=None,
                        status_calls=1,
                        attempt=0,
                    ),
                )
                if due - now > park_after:
                    # update.lua scores the due index at its own TIME + countdown, a little
                    # after ``now`` here (the rest of the batch is computed in between)
                    pins.add(len(pipe))
                    queued.set_due(job.id, due)
                ids.append(job.id)
            results = pipe.execute()
        refused = sum(r != 1 for n, r in enumerate(results) if n not in pins)
        if refused:
            raise BenchError(f"seeding: {refused} writes refused (version moved?)")
    return ids


def _seed(stack: Stack, producer: Any, plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Seeded mode, before the workers start: the jobs in flight and the first checks planned
    from ``plan.seed_lead_s`` after now (the window's start, store clock), evenly over one
    mean interval. Ids, timings and that start."""
    store = producer.rt.store
    started = time.monotonic()
    window_at = store.now() + plan.seed_lead_s
    ids = seed_jobs(
        stack.redis,
        producer.rt.settings,
        stack.emulator.emulator,
        make_publisher(producer.app),
        jobs=plan.jobs,
        first_due=window_at,
        span_s=plan.mean_interval_s,
        run_s=plan.run_s,
    )
    seconds = time.monotonic() - started
    say(f"  seeded {plan.jobs:,} jobs in flight in {seconds:.1f}s ({plan.jobs / seconds:,.0f}/s)")
    # the window's start on this process's clock (the same host's: equal but for the call)
    return {"ids": ids, "seed_s": seconds, "window_at": window_at - store.now() + time.time()}


# ---------------------------------------------------------------------------- the run
def _start(workers: list[Worker]) -> None:
    """Start them all at once; W imports at once on 2 cores take a while."""
    with ThreadPoolExecutor(len(workers)) as pool:
        for future in [pool.submit(w.start, 60.0 + 10.0 * len(workers)) for w in workers]:
            future.result()


def _drain(stack: Stack, plan: Plan) -> float:
    """Wait (at most one interval, 2 min at most) until the broker queues hold less than half
    a second of checks: the checks held up behind the submit burst have run, and what is
    measured is the steady schedule. Seconds waited (a fleet that cannot drain its backlog is
    measured anyway: the window's start queues are in the details)."""
    started = time.monotonic()
    deadline = started + min(plan.max_interval_s, 120.0)
    limit = max(20.0, plan.planned_per_s / 2)
    calm = 0
    while calm < 3 and time.monotonic() < deadline:
        calm = calm + 1 if sum(queue_lengths(stack.redis).values()) <= limit else 0
        time.sleep(0.25)
    return time.monotonic() - started


def _submitted(
    stack: Stack,
    plan: Plan,
    log: CallLog,
    phases: dict[str, Any],
    started: float,
    say: Callable[[str], None],
) -> None:
    """Submit mode, once the workers are up: wait until they submitted every job, every job
    had its first check and the backlog behind the submits drained."""

    def submitted() -> bool:
        return log.submits >= plan.jobs

    wait_until(submitted, 120 + plan.jobs / 20, "every job to be submitted", 0.2)
    last_submit = time.time()
    submit_s = phases["submit_s"] = last_submit - started
    say(f"  submitted upstream {submit_s:.0f}s after start ({plan.jobs / submit_s:,.0f}/s)")
    steady_at = last_submit + plan.ramp_s + min(10.0, plan.max_interval_s / 10)
    say(f"  steady schedule in {steady_at - time.time():.0f}s")
    time.sleep(max(0.0, steady_at - time.time()))
    drained_s = phases["drained_s"] = _drain(stack, plan)
    say(f"  backlog of the submit burst drained in {drained_s:.0f}s")


def _settle(plan: Plan, phases: dict[str, Any], ready: float, say: Callable[[str], None]) -> None:
    """Seeded mode, once the workers are up: wait for the first planned check (the window's
    start). Workers ready too late for ``settle_s`` before it (the guesses behind
    ``seed_lead_s`` were low) had checks due before they were up: the window then starts
    ``settle_s`` after they were, past that backlog; ``late_s`` says by how much."""
    late = max(0.0, ready + plan.settle_s - phases["window_at"])
    phases["late_s"] = late
    if late > 0:
        say(
            f"  ready {late:.0f}s too late for a {plan.settle_s:g}s settle before the first "
            f"check: the window starts {plan.settle_s:g}s after the workers were ready"
        )
        phases["window_at"] = ready + plan.settle_s
    phases["settle_s"] = phases["window_at"] - ready
    say(f"  settling {phases['settle_s']:.0f}s until the first planned check")
    time.sleep(max(0.0, phases["window_at"] - time.time()))


def _enqueue(producer: Any, n: int) -> tuple[list[str], float]:
    """``n`` jobs through ``enqueue_many``; (ids, seconds)."""
    ids: list[str] = []
    started = time.monotonic()
    for first in range(0, n, ENQUEUE_BATCH):
        batch = [job_request(n=i) for i in range(first, min(n, first + ENQUEUE_BATCH))]
        ids += [record.id for record in producer.enqueue_many(batch)]
    return ids, time.monotonic() - started


def measure(stack: Stack, plan: Plan, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``plan`` on ``stack``; the figures as a dict (see :func:`rows`)."""
    say(describe(plan))
    stack.redis.flushall()
    stack.emulator.update_config(
        queue_s=0,
        run_s=plan.run_s,
        capacity=1_000_000,
        output_min_bytes=0,
        max_concurrent=None,
        max_submits_per_s=None,
        balance=None,
        request_ttl_s=None,
        faults=[],
        fault_rates={},
    )
    shared = settings_env(plan)
    ports = [free_port() for _ in range(plan.workers)]
    workers = [
        Worker(
            stack.env(
                0,
                **shared,
                POLL_INITIAL_DELAY_S=str(
                    plan.first_check_s if plan.seeded else plan.initial_delay_s(i)
                ),
                WORKER_METRICS_PORT=str(port),
            ),
            concurrency=plan.concurrency,
            name=f"fleet{i}",
        )
        for i, port in enumerate(ports)
    ]
    producer = stack.producer(0, **shared)
    log = CallLog(stack.emulator.emulator)
    redis_pid = int(stack.redis.info("server")["process_id"])
    phases: dict[str, Any] = {"mode": "seeded" if plan.seeded else "submit"}
    try:
        redis_idle = int(stack.redis.info("memory")["used_memory"])
        if plan.seeded:
            seeded = _seed(stack, producer, plan, say)
            ids = seeded.pop("ids")
            phases.update(seeded)
        else:
            # Enqueued before the workers start: the producer's rate, not the machine's
            # leftovers.
            ids, enqueue_s = _enqueue(producer, plan.jobs)
            phases["enqueue_s"] = enqueue_s
            say(f"  enqueued {plan.jobs:,} in {enqueue_s:.1f}s ({plan.jobs / enqueue_s:,.0f}/s)")
        started = time.time()
        _start(workers)
        ready = time.time()
        rss_start = [w.rss() for w in workers]
        phases["start_s"] = ready - started
        say(f"  {plan.workers} workers ready in {ready - started:.0f}s")
        if plan.seeded:
            _settle(plan, phases, ready, say)
        else:
            _submitted(stack, plan, log, phases, started, say)

        sample = random.Random(0).sample(ids, min(plan.sample, len(ids)))
        log.recording = True
        before = read_all(log, workers, ports, redis_pid)
        queues_before = queue_lengths(stack.redis)
        planned = planned_checks(producer.rt.store, sample)
        sampled_from = time.time() + 0.5  # planned before this may be in flight already
        say(f"  measuring for {plan.window_s:g}s")
        time.sleep(max(0.0, before.at + plan.window_s - time.time()))
        after = read_all(log, workers, ports, redis_pid)
        log.recording = False
        rss = [w.rss() for w in workers]
        redis_used = int(stack.redis.info("memory")["used_memory"])
        due_index = int(stack.redis.zcard(DUE_KEY))
        held = unacked(stack.redis)
        queues_after = queue_lengths(stack.redis)
        alive = sum(w.alive() for w in workers)
    finally:
        log.remove()
        for w in workers:
            w.kill()  # held countdowns would go back to a queue that is flushed next anyway
        close_all(workers)
        producer.app.close_runtime()
        stack.redis.flushall()
        stack.emulator.reset()  # forget 100,000 requests (counters() walks them all)

    seconds = after.at - before.at
    buckets = delta(before.metrics, after.metrics, LATENESS_METRIC + "_bucket")
    p95_hist, capped = histogram_quantile(buckets, 0.95)
    p50_hist, _ = histogram_quantile(buckets, 0.50)
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    machine_busy = busy / total if total else 0.0
    worker_cpu = [b - a for a, b in zip(before.worker_cpu, after.worker_cpu, strict=True)]
    redis_cores = (after.redis_cpu - before.redis_cpu) / seconds
    bench_cores = (after.bench_cpu - before.bench_cpu) / seconds
    ours = sum(worker_cpu) / seconds + redis_cores + bench_cores
    gaps = log.gaps()
    checks = after.status_calls - before.status_calls
    worker_checks = sum(
        v
        for k, v in delta(before.metrics, after.metrics, "runcomfy_upstream_calls_total").items()
        if "call=status" in k
    )
    return {
        "plan": {
            **asdict(plan),
            "mean_interval_s": plan.mean_interval_s,
            "reconcile_batch": plan.reconcile_batch,
            "parked": plan.parked,
            "wake_setting": _has_wake_setting(),
        },
        "workers_alive": alive,
        **phases,
        "window_s": seconds,
        "checks": checks,
        "checks_per_s": checks / seconds,
        "planned_per_s": plan.planned_per_s,
        "worker_status_calls": worker_checks,
        "repeat_checks": sum(g < plan.max_interval_s / 2 for g in gaps),
        "interval_held_s": {f"p{q}": percentile(gaps, q) if gaps else None for q in (5, 50, 95)},
        "queues_at_start": queues_before,
        "queues_at_end": queues_after,
        "lateness_histogram": {
            "observations": buckets.get("+Inf", 0.0),
            "p50_s": p50_hist,
            "p95_s": p95_hist,
            "p95_in_inf_bucket": capped,
            "buckets": buckets,
        },
        "lateness_emulator": {
            "sampled_jobs": len(sample),
            "planned_in_window": len(planned),
            **emulator_lateness(planned, log, sampled_from, after.at - plan.tail_s),
            "tail_s": plan.tail_s,
        },
        "rss_mb": sorted(r / MIB for r in rss),
        "rss_at_start_mb": sorted(r / MIB for r in rss_start),
        "redis_idle_bytes": redis_idle,
        "redis_used_bytes": redis_used,
        "redis_bytes_per_job": (redis_used - redis_idle) / plan.jobs,
        "due_index": due_index,
        "held_by_workers": held,
        "worker_cpu_cores": sum(worker_cpu) / seconds,
        "worker_cpu_cores_each": [c / seconds for c in worker_cpu],
        "redis_cpu_cores": redis_cores,
        "bench_cpu_cores": bench_cores,
        "machine_busy": machine_busy,
        "machine_cores": os.cpu_count(),
        # what the machine spent outside this run (other work on a shared host)
        "other_cpu_cores": max(0.0, machine_busy * (os.cpu_count() or 1) - ours),
        "reconciled": delta(before.metrics, after.metrics, "runcomfy_reconciled_total"),
        "parked_waits": delta(before.metrics, after.metrics, "runcomfy_parked_waits_total"),
    }


def rows(got: dict[str, Any]) -> list[Row]:
    """The table rows of one :func:`measure`."""
    plan = got["plan"]
    scale = f"{plan['jobs']:,} jobs / {plan['workers']} workers"
    hist = got["lateness_histogram"]
    emu = got["lateness_emulator"]
    emu_text = (
        f"emulator side: p50 {emu['p50_s']:.2f}s p95 {emu['p95_s']:.2f}s max "
        f"{emu['max_s'] if emu['max_s'] is not None else math.nan:.2f}s over {emu['checks']} "
        f"sampled checks, {emu['missing']} not seen within {emu['tail_s']:g}s"
        if emu["checks"]
        else "emulator side: no sampled check planned in the window"
    )
    if hist["observations"]:
        p95 = hist["p95_s"]
        source = (
            f"worker histogram, {hist['observations']:,.0f} checks"
            + (" (p95 in the +Inf bucket: a lower bound)" if hist["p95_in_inf_bucket"] else "")
            + f"; {emu_text}"
        )
    else:
        p95 = emu["p95_s"]
        source = f"{LATENESS_METRIC} not observed by these workers; {emu_text}"
        if p95 is not None and math.isinf(p95):
            p95 = None
            source += f" (p95 later than the {emu['tail_s']:g}s tail)"
    path = (
        "waits parked in rcw:due, sent by the reconciler/wake loop"
        if plan["parked"]
        else "waits held as countdowns by the workers"
    )
    if got.get("mode") == "seeded":
        path += f"; jobs seeded in flight ({got['seed_s']:.0f}s), settled {got['settle_s']:.0f}s"
        if got["late_s"] > 0:
            path += f", workers ready {got['late_s']:.0f}s later than planned"
    else:
        path += "; jobs submitted by the workers"
    rss = got["rss_mb"]
    backlog = sum(got["queues_at_end"].values())
    held = got["interval_held_s"]
    gap_text = (
        f" (intervals seen: p5 {held['p5']:.0f}s, median {held['p50']:.0f}s)"
        if held["p50"] is not None
        else ""
    )
    ok = got["workers_alive"] == plan["workers"]
    return [
        Row(
            f"fleet ({scale}): status-check lateness p95",
            p95,
            "s",
            target="≤ 1 s",
            passed=ok and p95 is not None and p95 <= TARGET_P95_S,
            note=f"{source}; {path}",
            details=got,
        ),
        Row(
            f"fleet ({scale}): status checks/s held",
            got["checks_per_s"],
            "/s",
            baseline=got["planned_per_s"],
            target="report (baseline = planned, jobs / mean interval)",
            note=(
                f"POLL_MAX_INTERVAL_S={plan['max_interval_s']:g} (mean "
                f"{plan['mean_interval_s']:.0f}s); {got['checks']:,} emulator status calls in "
                f"{got['window_s']:.0f}s, {got['repeat_checks']:,} of them within half an "
                f"interval of the job's previous one{gap_text}; {backlog:,} messages queued at "
                f"the end; "
                f"machine {got['machine_busy']:.0%} busy of "
                f"{got['machine_cores']} cores, {got['other_cpu_cores']:.2f} of them "
                f"by processes outside this run"
            ),
        ),
        Row(
            f"fleet ({scale}): worker RSS (median)",
            statistics.median(rss),
            "MB",
            target="report",
            note=(
                f"min {rss[0]:.0f} / max {rss[-1]:.0f} MB; median just after start "
                f"{statistics.median(got['rss_at_start_mb']):.0f} MB; "
                f"{got['held_by_workers']:,} countdowns held fleet-wide"
            ),
        ),
        Row(
            f"fleet ({scale}): Redis memory per job in flight",
            got["redis_bytes_per_job"] / 1024,
            "KiB",
            target="report",
            note=(
                f"used_memory {got['redis_used_bytes'] / MIB:.0f} MB minus "
                f"{got['redis_idle_bytes'] / MIB:.1f} MB idle; {got['due_index']:,} in rcw:due"
            ),
        ),
        Row(
            f"fleet ({scale}): worker CPU (all workers)",
            got["worker_cpu_cores"],
            "cores",
            target="report",
            note=(
                f"{got['worker_cpu_cores'] / max(got['checks_per_s'], 1e-9) * 1000:.1f} ms "
                f"per check; bench process (emulator) {got['bench_cpu_cores']:.2f} cores"
            ),
        ),
        Row(
            f"fleet ({scale}): Redis CPU",
            got["redis_cpu_cores"],
            "cores",
            target="report",
            note=(
                f"{got['redis_cpu_cores'] / max(got['checks_per_s'], 1e-9) * 1000:.2f} ms per check"
            ),
        ),
    ]


def run(stack: Stack, quick: bool) -> list[Row]:
    """The figure for ``python -m bench``."""
    return rows(measure(stack, QUICK if quick else FULL, say=lambda s: print(s, flush=True)))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fleet``: one run on its own stack, the rows printed."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="the CI size (default: full)")
    parser.add_argument("--jobs", type=int, help="jobs in flight")
    parser.add_argument("--workers", type=int, help="worker processes")
    parser.add_argument("--concurrency", type=int, help="threads per worker")
    parser.add_argument("--max-interval", type=float, help="POLL_MAX_INTERVAL_S (= min)")
    parser.add_argument("--first-check", type=float, help="POLL_INITIAL_DELAY_S of worker 0")
    parser.add_argument(
        "--stagger",
        action=argparse.BooleanOptionalAction,
        help="first checks staggered by worker over one interval (default: on; --quick: off)",
    )
    parser.add_argument("--window", type=float, help="measurement window, seconds")
    parser.add_argument("--reconcile-interval", type=float, help="RECONCILE_INTERVAL_S")
    parser.add_argument("--reconcile-wake", type=float, help="RECONCILE_WAKE_S, if it exists")
    parser.add_argument("--sample", type=int, help="jobs sampled for emulator-side lateness")
    parser.add_argument("--tail", type=float, help="emulator side: seconds allowed at the end")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--seed",
        dest="seeded",
        action="store_true",
        default=None,
        help="seed the jobs in flight before the workers start (the default)",
    )
    mode.add_argument(
        "--submit",
        dest="seeded",
        action="store_false",
        help="submit the jobs through the workers, then wait for a steady schedule",
    )
    parser.add_argument(
        "--settle", type=float, help="seeded: seconds the workers run before the window"
    )
    parser.add_argument("--json", action="store_true", help="also print the details as JSON")
    args = parser.parse_args(argv)
    options = {
        "jobs": args.jobs,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "max_interval_s": args.max_interval,
        "first_check_s": args.first_check,
        "stagger": args.stagger,
        "window_s": args.window,
        "reconcile_interval_s": args.reconcile_interval,
        "reconcile_wake_s": args.reconcile_wake,
        "sample": args.sample,
        "tail_s": args.tail,
        "seeded": args.seeded,
        "settle_s": args.settle,
    }
    plan = replace(
        QUICK if args.quick else FULL, **{k: v for k, v in options.items() if v is not None}
    )
    if plan.jobs < 1 or plan.workers < 1 or plan.window_s <= plan.tail_s:
        parser.error("need --jobs ≥ 1, --workers ≥ 1 and --window > --tail")

    import json

    from bench.__main__ import render
    from bench.common import AWS_ENV

    os.environ.update(AWS_ENV)
    # SIGTERM (timeout, CI cancel): unwind, so the workers (own sessions) are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with Stack(s3=False) as stack:
            got = measure(stack, plan, say=lambda s: print(s, flush=True))
    except BenchError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    print()
    print(render(rows(got)))
    if args.json:
        print(json.dumps(got, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
