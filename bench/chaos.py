"""``python -m bench.chaos [--quick] [--jobs N]`` (``make chaos``): many jobs through real
workers while things break, then proof that every job still reached a final state.

The stack: a real ``redis-server`` with AOF (everysec), moto's S3 (behind a proxy that can
refuse connections), the RunComfy emulator, a webhook receiver (behind another proxy) and 3
worker processes. On a timeline, while the jobs run:

* a worker is SIGKILLed every few seconds (and a new one started);
* broker messages of some jobs are deleted from Redis (queues and ``unacked``);
* the webhook receiver refuses connections for a while (30 s; quick: 15 s);
* S3 refuses connections (15 s; quick: 8 s);
* upstream answers 503 to everything (10 s; quick: 6 s).

Then it waits for every job (and webhook) to settle and prints a table (JSON under
bench/results/): jobs, final, succeeded, lost (never final), duplicate upstream submits (and
how many were counted as ambiguous), orphan S3 objects, webhook ids per job, seconds from the
last fault to the last job final, recovery of the jobs whose messages were deleted, p50/p95
latency, and product keys left in Redis without a TTL. Exit status 1 when a target is missed
(0 lost, 0 orphans, one webhook id per job, deleted-message jobs final within two reconcile
intervals plus their runtime), so CI runs the quick form as a test.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from api_contracts.messages import ALL_QUEUES
from bench.common import (
    BUCKET,
    TOKEN,
    WEBHOOK_SECRET,
    S3Process,
    Worker,
    bench_env,
    close_all,
    percentile,
    start_all,
)
from bench.faultproxy import FaultProxy
from worker.constants import INFLIGHT_KEY
from worker.devtools.embedded import EmbeddedRedis, EmbeddedSentinelGroup
from worker.devtools.emulator import EmulatorConfig, EmulatorServer
from worker.devtools.receiver import WebhookReceiver
from worker.services.redis_client import make_redis
from worker.settings import load_settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Keys meant to live without a TTL (counters, indexes, the dead-letter list, the waiting
#: room's structure); job records, idempotency keys and the like must all expire.
PERMANENT_KEYS = frozenset(
    {"rcw:stats", "rcw:inflight", "rcw:due", "rcw:dead", "rcw:slots", "rcw:waiting", "rcw:wrr"}
)
PERMANENT_PREFIXES = ("rcw:slots:t:", "rcw:rr:", "rcw:wait:")
RECONCILE_INTERVAL_S = 3.0
RECONCILE_GRACE_S = 3.0
RUN_S = 2.0
QUEUE_S = 0.3
#: What a republished step may take to run and write (part of the job's own runtime).
STEP_ALLOWANCE_S = 2.0


@dataclass
class Plan:
    """The timeline, in seconds from the first job. A fault set to None does not happen."""

    jobs: int
    scenario: str = "mixed"
    workers: int = 3
    kill_every_s: float | None = 4.0
    delete_every_s: float | None = 2.0
    faults_until_s: float = 60.0
    receiver_down: tuple[float, float] | None = (10.0, 30.0)
    s3_down: tuple[float, float] | None = (20.0, 15.0)
    upstream_503: tuple[float, float] | None = (30.0, 10.0)
    #: (when, seconds down): a graceful restart, a kill -9 (AOF everysec), or killing the
    #: Sentinel group's master (the failover is not waited for: Sentinel does it)
    redis_event: tuple[float, float] | None = None
    settle_timeout_s: float = 300.0

    @classmethod
    def quick(cls, jobs: int) -> Plan:
        """The CI form of the mixed run: fewer jobs, a shorter timeline."""
        return cls(
            jobs=jobs,
            faults_until_s=30.0,
            receiver_down=(5.0, 15.0),
            s3_down=(10.0, 8.0),
            upstream_503=(16.0, 6.0),
            settle_timeout_s=240.0,
        )

    @classmethod
    def redis(cls, scenario: str, jobs: int) -> Plan:
        """One Redis event in the middle of a stream of jobs, nothing else."""
        return cls(
            jobs=jobs,
            scenario=scenario,
            kill_every_s=None,
            delete_every_s=None,
            faults_until_s=20.0,
            receiver_down=None,
            s3_down=None,
            upstream_503=None,
            redis_event=(8.0, 3.0),
            settle_timeout_s=180.0,
        )


#: The scenarios, and what a run of each holds it to (jobs lost).
SCENARIOS = ("mixed", "redis-restart", "redis-kill", "sentinel-failover")


@dataclass
class Timeline:
    """What was done when (seconds from the start)."""

    started: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    deleted: dict[str, float] = field(default_factory=dict)  # job id -> when its messages went
    #: job id -> (version when its messages were deleted, when its due time was then)
    watched: dict[str, tuple[int, float]] = field(default_factory=dict)
    progressed: dict[str, float] = field(default_factory=dict)  # job id -> next write seen
    redis_back: float | None = None  # when Redis (or the new master) answered again
    #: job id -> version, of the jobs in flight just before the Redis event
    before_redis: dict[str, int] = field(default_factory=dict)
    after_redis: dict[str, float] = field(default_factory=dict)  # job id -> first move after
    kills: int = 0
    last_fault: float = 0.0

    def now(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.started

    def note(self, what: str, *, fault: bool = True) -> None:
        """Log one event; a fault moves ``last_fault``."""
        at = self.now()
        self.events.append((round(at, 2), what))
        if fault:
            self.last_fault = at
        print(f"  {at:6.1f}s  {what}", file=sys.stderr)


class Chaos:
    """The stack, the workers, and the fault injectors."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.group = EmbeddedSentinelGroup() if plan.scenario == "sentinel-failover" else None
        self.redis_server = self.group.master if self.group else EmbeddedRedis(aof="everysec")
        self.s3 = S3Process()
        self.emulator = EmulatorServer(
            EmulatorConfig(token=TOKEN, queue_s=QUEUE_S, run_s=RUN_S, capacity=256, seed=5)
        )
        self.receiver = WebhookReceiver(WEBHOOK_SECRET)
        self.workers: list[Worker] = []
        self.timeline = Timeline()
        self.rng = random.Random(42)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.killed: set[int] = set()  # pids this run SIGKILLed

    # -------------------------------------------------------------------------- stack
    def __enter__(self) -> Chaos:
        if self.group is not None:
            self.group.start()
        else:
            self.redis_server.start()
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        self.s3_proxy = FaultProxy("127.0.0.1", self.s3.port).up()
        self.emulator.start()
        self.receiver.start()
        self.receiver_proxy = FaultProxy("127.0.0.1", self.receiver.port).up()
        self.redis = make_redis(load_settings(environ=self.env()).redis)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        close_all(self.workers)
        for closer in (
            self.receiver_proxy.close,
            self.receiver.close,
            self.emulator.close,
            self.s3_proxy.close,
            self.s3.close,
            self.redis.close,
            self.group.close if self.group is not None else self.redis_server.close,
        ):
            closer()

    def env(self) -> dict[str, str]:
        """Worker settings: short polls, fast reconcile, a webhook schedule that parks."""
        redis_env = (
            {"REDIS_URL": self.group.url, "REDIS_SENTINEL_MASTER": self.group.MASTER_NAME}
            if self.group is not None
            else {"REDIS_URL": self.redis_server.url}
        )
        return bench_env(
            **redis_env,
            RUNCOMFY_BASE_URL=self.emulator.base_url,
            RUNCOMFY_API_TOKEN=TOKEN,
            RUNCOMFY_READ_TIMEOUT_S="5",
            S3_BUCKET=BUCKET,
            S3_PREFIX="chaos/",
            S3_ENDPOINT_URL=self.s3_proxy.url(),
            S3_RETRY_WINDOW_S="120",
            WEBHOOK_SECRET=WEBHOOK_SECRET,
            WEBHOOK_TIMEOUT_S="3",
            # the third retry (70 s) is longer than a countdown: parked in the due index
            WEBHOOK_RETRY_SCHEDULE="1,5,70,70,70",
            ALLOW_PRIVATE_NETWORKS="true",
            POLL_INITIAL_DELAY_S="0.5",
            POLL_MIN_INTERVAL_S="0.5",
            POLL_MAX_INTERVAL_S="2",
            JOB_DEADLINE_S="600",
            RECONCILE_INTERVAL_S=str(RECONCILE_INTERVAL_S),
            RECONCILE_GRACE_S=str(RECONCILE_GRACE_S),
            SUBMIT_GRACE_S="30",
            BROKER_VISIBILITY_TIMEOUT_S="3600",
            WORKER_LOG_JSON="true",
            WORKER_LOG_LEVEL="INFO",  # the "ready" line is what start() waits for
        )

    def new_worker(self) -> Worker:
        """A worker process on all queues (not started)."""
        worker = Worker(self.env(), concurrency=8, name=f"chaos{len(self.workers)}")
        with self._lock:
            self.workers.append(worker)
        return worker

    # -------------------------------------------------------------------------- faults
    def _every(self, period: float, start: float, action: Callable[[], None]) -> None:
        next_at = start
        while not self._stop.is_set() and self.timeline.now() < self.plan.faults_until_s:
            if self.timeline.now() >= next_at:
                action()
                next_at += period
            time.sleep(0.05)

    def _kill_one(self) -> None:
        with self._lock:
            alive = [w for w in self.workers if w.alive()]
        if not alive:
            return
        victim = self.rng.choice(alive)
        self.killed.add(victim.pid)
        victim.kill()
        self.timeline.kills += 1
        self.timeline.note(f"SIGKILL worker pid {victim.pid}")
        self.new_worker().start()

    def _delete_some(self) -> None:
        victims = [j for j in self._in_flight_sample(3) if j not in self.timeline.deleted]
        removed = 0
        for job_id in victims:
            removed += delete_messages_of(self.redis, job_id)
            now = self.timeline.now()
            self.timeline.deleted[job_id] = now
            version = self.redis.hget(f"rcw:job:{job_id}", "version")
            score = self.redis.zscore("rcw:due", job_id)
            seconds, micros = self.redis.time()
            due_in = 0.0 if score is None else score - (seconds + micros / 1e6)
            if version is not None:
                self.timeline.watched[job_id] = (int(version), now + max(0.0, due_in))
        if victims:
            self.timeline.note(f"deleted {removed} broker message(s) of {len(victims)} job(s)")

    def _in_flight_sample(self, n: int) -> list[str]:
        members = [m.decode() for m in cast("list[bytes]", self.redis.zrange(INFLIGHT_KEY, 0, -1))]
        return self.rng.sample(members, min(n, len(members)))

    def _window(self, at: float, length: float, name: str, down: Callable[[], object],
                up: Callable[[], object]) -> None:  # fmt: skip
        while not self._stop.is_set() and self.timeline.now() < at:
            time.sleep(0.05)
        down()
        self.timeline.note(f"{name} down for {length:.0f}s")
        end = at + length
        while not self._stop.is_set() and self.timeline.now() < end:
            time.sleep(0.05)
        up()
        self.timeline.note(f"{name} back")

    def _upstream_503(self, on: bool) -> None:
        self.emulator.set_faults([], {"503@any": 1.0} if on else {})

    def _watch_progress(self) -> None:
        """When does each job whose messages were deleted next move (its version changes)?"""
        while not self._stop.is_set():
            for job_id, (version, _due) in list(self.timeline.watched.items()):
                if job_id in self.timeline.progressed:
                    continue
                now_version = self.redis.hget(f"rcw:job:{job_id}", "version")
                if now_version is None or int(now_version) != version:
                    self.timeline.progressed[job_id] = self.timeline.now()
            time.sleep(0.1)

    def _redis_event(self, at: float, down_s: float) -> None:
        while not self._stop.is_set() and self.timeline.now() < at:
            time.sleep(0.02)
        self.timeline.before_redis = self._versions_in_flight()
        scenario = self.plan.scenario
        if scenario == "sentinel-failover":
            assert self.group is not None
            old = self.group.current_master_port()
            assert old is not None
            self.group.server_on(old).kill()
            self.timeline.note(f"Redis master (port {old}) SIGKILLed")
            new = self.group.wait_failover(old)
            self.timeline.note(f"Sentinel promoted port {new}")
        else:
            if scenario == "redis-kill":
                self.redis_server.kill()
                self.timeline.note("Redis SIGKILLed (AOF everysec)")
            else:
                self.redis_server.stop()
                self.timeline.note("Redis stopped (graceful)")
            time.sleep(down_s)
            self.redis_server.start()
            self.timeline.note("Redis started again")
        self.timeline.redis_back = self.timeline.now()
        threading.Thread(target=self._watch_after_redis, daemon=True).start()

    def _versions_in_flight(self) -> dict[str, int]:
        versions = {}
        for member in cast("list[bytes]", self.redis.zrange(INFLIGHT_KEY, 0, -1)):
            job_id = member.decode()
            version = self.redis.hget(f"rcw:job:{job_id}", "version")
            if version is not None:
                versions[job_id] = int(version)
        return versions

    def _watch_after_redis(self) -> None:
        """When does each job that was in flight at the Redis event move past the version it
        had then (a reverted write must be redone first)?"""
        pending = dict(self.timeline.before_redis)
        while pending and not self._stop.is_set():
            for job_id, version in list(pending.items()):
                try:
                    now_version = self.redis.hget(f"rcw:job:{job_id}", "version")
                except redis.RedisError:
                    continue
                if now_version is not None and int(now_version) > version:
                    self.timeline.after_redis[job_id] = self.timeline.now()
                    del pending[job_id]
            time.sleep(0.1)

    def run_faults(self) -> list[threading.Thread]:
        """Start every injector on its own thread (and the progress watcher)."""
        threading.Thread(target=self._watch_progress, daemon=True).start()
        plan = self.plan
        jobs: list[Callable[[], None]] = []
        if plan.kill_every_s:
            jobs.append(lambda: self._every(plan.kill_every_s or 0, 2.0, self._kill_one))
        if plan.delete_every_s:
            jobs.append(lambda: self._every(plan.delete_every_s or 0, 3.0, self._delete_some))
        if plan.receiver_down:
            receiver = plan.receiver_down
            jobs.append(
                lambda: self._window(
                    *receiver, "receiver", self.receiver_proxy.down, self.receiver_proxy.up
                )
            )
        if plan.s3_down:
            s3 = plan.s3_down
            jobs.append(lambda: self._window(*s3, "S3", self.s3_proxy.down, self.s3_proxy.up))
        if plan.upstream_503:
            upstream = plan.upstream_503
            jobs.append(
                lambda: self._window(
                    *upstream,
                    "upstream (503)",
                    lambda: self._upstream_503(True),
                    lambda: self._upstream_503(False),
                )
            )
        if plan.redis_event:
            event = plan.redis_event
            jobs.append(lambda: self._redis_event(*event))
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        for thread in threads:
            thread.start()
        return threads


def delete_messages_of(client: redis.Redis, job_id: str) -> int:
    """Delete every broker message naming ``job_id``: queued ones and kombu's ``unacked``."""
    needle = job_id.encode()
    removed = 0
    for queue in ALL_QUEUES:
        for raw in client.lrange(queue, 0, -1):
            if needle in raw:
                # redis-py's stubs say str; it sends bytes as they are.
                removed += int(client.lrem(queue, 1, raw))  # type: ignore[arg-type]
    for tag, raw in client.hgetall("unacked").items():
        if needle in raw:
            removed += int(client.hdel("unacked", tag))
            client.zrem("unacked_index", tag)
    return removed


# ------------------------------------------------------------------------------ the run
def run(plan: Plan) -> dict[str, Any]:
    """Run the chaos timeline; the figures as a dict."""
    from worker.producer.producer import Producer
    from worker.queueing.run import create_app

    with Chaos(plan) as chaos:
        workers = [chaos.new_worker() for _ in range(plan.workers)]
        start_all(workers)
        app = create_app(load_settings(environ=chaos.env()))
        producer = Producer(app.runtime, app)
        chaos.timeline = Timeline()
        print(f"chaos {plan.scenario}: {plan.jobs} jobs, {plan.workers} workers", file=sys.stderr)
        threads = chaos.run_faults()
        # Jobs arrive over most of the fault window, so every fault meets jobs in every state.
        ids: list[str] = []
        batch_size = 10
        spread_s = plan.faults_until_s * 0.8
        for start in range(0, plan.jobs, batch_size):
            due = spread_s * start / plan.jobs
            while chaos.timeline.now() < due:
                time.sleep(0.02)
            batch = [
                {
                    "input": {
                        "prompt": f"chaos job {i}",
                        "size": "1024x1024",
                        "force_single": True,
                    },
                    "webhook_url": chaos.receiver_proxy.url(path="/hook"),
                    # a producer retrying through a Redis outage keeps its jobs' identity
                    "idempotency_key": f"chaos-{i}",
                }
                for i in range(start, min(plan.jobs, start + batch_size))
            ]
            ids += [r.id for r in enqueue_retrying(producer, batch)]
        for thread in threads:
            thread.join()
        settled_at = wait_settled(producer, ids, plan.settle_timeout_s)
        figures = measure(chaos, producer, ids, settled_at)
        # a worker that exited while nobody killed it (e.g. on a Redis hiccup) is a bug
        figures["worker_exits_not_killed"] = sum(
            1 for w in chaos.workers if not w.alive() and w.pid not in chaos.killed
        )
        app.close_runtime()
    return figures


def enqueue_retrying(producer: Any, batch: list[dict[str, Any]]) -> list[Any]:
    """What a producer does through a Redis outage: try again (same idempotency keys)."""
    from kombu.exceptions import KombuError

    deadline = time.monotonic() + 60
    while True:
        try:
            return list(producer.enqueue_many(batch))
        except (redis.RedisError, KombuError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_settled(producer: Any, ids: list[str], timeout_s: float) -> float:
    """Wait until every job is final and owes no webhook; when that happened (monotonic)."""
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            try:
                job = producer.rt.store.get(job_id)
            except redis.RedisError:
                break
            webhook = job.record.webhook if job else None
            if job and job.status.is_terminal and (webhook is None or webhook.state != "pending"):
                pending.discard(job_id)
        if pending:
            time.sleep(0.5)
    return time.monotonic()


def measure(chaos: Chaos, producer: Any, ids: list[str], settled_at: float) -> dict[str, Any]:
    """Every figure of the table."""
    store = producer.rt.store
    jobs = {job_id: store.get(job_id) for job_id in ids}
    records = {k: v.record for k, v in jobs.items() if v is not None}
    final = [r for r in records.values() if r.status.is_terminal]
    succeeded = [r for r in final if r.status == "succeeded"]
    failed_codes = Counter(r.error.code for r in final if r.error is not None)
    lost = [
        job_id for job_id in ids if job_id not in records or not records[job_id].status.is_terminal
    ]

    prompts = {f"chaos job {i}": job_id for i, job_id in enumerate(ids)}
    submits = Counter(
        prompts.get(r.get("prompt", ""), "?") for r in chaos.emulator.emulator.requests_snapshot()
    )
    duplicates = {job_id: n - 1 for job_id, n in submits.items() if job_id in records and n > 1}

    s3 = chaos.s3.client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="chaos/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    expected = {o.key for r in succeeded for o in r.outputs}
    orphans = [k for k in keys if k not in expected]

    events = chaos.receiver.events_by_id()
    ids_per_job: Counter[str] = Counter()
    for webhook_id in events:
        ids_per_job[webhook_id.removeprefix("msg_")] += 1
    not_one_id = [job_id for job_id in ids if job_id in records and ids_per_job[job_id] != 1]

    finished = [r.finished_at for r in final if r.finished_at is not None]
    last_final = max(finished) if finished else None
    start_wall = datetime.now(UTC).timestamp() - chaos.timeline.now()
    last_fault_wall = start_wall + chaos.timeline.last_fault
    latencies = [(r.finished_at - r.created_at).total_seconds() for r in succeeded if r.finished_at]

    # A job whose messages were deleted is stuck until its due time (the promised message's
    # due time + grace); from then, the reconciler must move it within two intervals.
    lateness = [
        chaos.timeline.progressed[job_id] - max(chaos.timeline.deleted[job_id], due)
        for job_id, (_version, due) in chaos.timeline.watched.items()
        if job_id in chaos.timeline.progressed
    ]
    never_moved = [j for j in chaos.timeline.watched if j not in chaos.timeline.progressed]
    to_final = [
        record.finished_at.timestamp() - (start_wall + deleted_at)
        for job_id, deleted_at in chaos.timeline.deleted.items()
        if (record := records.get(job_id)) is not None and record.finished_at is not None
    ]
    # two reconcile intervals, plus the republished step's own run (a status call, an upload)
    recovery_bound = 2 * RECONCILE_INTERVAL_S + STEP_ALLOWANCE_S

    no_ttl = []
    for key in chaos.redis.scan_iter("rcw:*", count=1000):
        name = key.decode()
        if (
            name not in PERMANENT_KEYS
            and not name.startswith(PERMANENT_PREFIXES)
            and chaos.redis.ttl(key) == -1
        ):
            no_ttl.append(name)

    back = chaos.timeline.redis_back
    moved = sorted(t - back for t in chaos.timeline.after_redis.values()) if back else []
    never_moved_after_redis = [
        j for j in chaos.timeline.before_redis if j not in chaos.timeline.after_redis
    ]
    stats = store.stats()
    return {
        "scenario": chaos.plan.scenario,
        "records_missing": sum(1 for job_id in ids if job_id not in records),
        "in_flight_at_redis_event": len(chaos.timeline.before_redis),
        "progress_again_p50_s": round(percentile(moved, 50), 1) if moved else None,
        "progress_again_max_s": round(moved[-1], 1) if moved else None,
        "never_moved_after_redis": len(never_moved_after_redis),
        "jobs": len(ids),
        "final": len(final),
        "succeeded": len(succeeded),
        "failed_by_code": dict(failed_codes),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "upstream_submits": sum(n for job_id, n in submits.items() if job_id != "?"),
        "jobs_submitted_twice_or_more": len(duplicates),
        "duplicate_submits": sum(duplicates.values()),
        "ambiguous_submits_counted": stats.get("ambiguous_submits", 0),
        "s3_objects": len(keys),
        "orphan_s3_objects": len(orphans),
        "orphans_sample": orphans[:10],
        "webhook_ids_delivered": len(events),
        "jobs_without_exactly_one_webhook_id": len(not_one_id),
        "seconds_last_fault_to_last_final": (
            round(last_final.timestamp() - last_fault_wall, 1) if last_final else None
        ),
        "jobs_with_deleted_messages": len(chaos.timeline.deleted),
        "deleted_moved_late_max_s": round(max(lateness), 1) if lateness else None,
        "deleted_never_moved": len(never_moved),
        "deleted_recovery_bound_s": recovery_bound,
        "deleted_time_to_final_max_s": round(max(to_final), 1) if to_final else None,
        "latency_p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 95), 2) if latencies else None,
        "redis_keys_without_ttl": len(no_ttl),
        "redis_keys_without_ttl_sample": no_ttl[:10],
        "workers_killed": chaos.timeline.kills,
        "reconciled": stats,
        "settle_wait_s": round(settled_at - chaos.timeline.started - chaos.timeline.last_fault, 1),
        "timeline": chaos.timeline.events,
    }


def verdicts(f: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, value, target, passed) rows; a kill -9 of Redis may lose what its AOF had not
    written yet, so its losses are reported, not held to 0."""
    scenario = f["scenario"]
    strict = scenario != "redis-kill"

    def held(ok: bool) -> bool | None:
        return ok if strict else None

    rows: list[tuple[str, str, str, bool | None]] = [
        ("jobs", str(f["jobs"]), "", None),
        ("final", str(f["final"]), "all" if strict else "report", held(f["final"] == f["jobs"])),
        ("succeeded", str(f["succeeded"]), "report", None),
        ("failed (by code)", json.dumps(f["failed_by_code"]), "report", None),
        ("lost (never final)", str(f["lost"]), "0" if strict else "report", held(f["lost"] == 0)),
        ("records gone from Redis", str(f["records_missing"]), "report", None),
        (
            "duplicate upstream submits",
            f"{f['duplicate_submits']} ({f['ambiguous_submits_counted']} counted ambiguous)",
            "report",
            None,
        ),
        ("orphan S3 objects", str(f["orphan_s3_objects"]), "0", f["orphan_s3_objects"] == 0),
        (
            "jobs without exactly one webhook id",
            str(f["jobs_without_exactly_one_webhook_id"]),
            "0" if strict else "report",
            held(f["jobs_without_exactly_one_webhook_id"] == 0),
        ),
    ]
    if scenario == "mixed":
        late = f["deleted_moved_late_max_s"]
        rows += [
            (
                "deleted-message jobs moving again, after due",
                f"{late} s worst ({f['jobs_with_deleted_messages']} jobs)",
                f"<= {f['deleted_recovery_bound_s']:.0f} s",
                (late is None or late <= f["deleted_recovery_bound_s"])
                and f["deleted_never_moved"] == 0,
            ),
            (
                "deleted-message jobs: worst time to final",
                f"{f['deleted_time_to_final_max_s']} s",
                "report",
                None,
            ),
        ]
    else:
        rows += [
            (
                "jobs in flight at the event: moving again",
                f"p50 {f['progress_again_p50_s']} s, max {f['progress_again_max_s']} s "
                f"({f['in_flight_at_redis_event']} jobs)",
                "report",
                None,
            ),
            (
                "jobs in flight at the event that never moved",
                str(f["never_moved_after_redis"]),
                "0" if strict else "report",
                held(f["never_moved_after_redis"] == 0),
            ),
        ]
    no_ttl, exits = f["redis_keys_without_ttl"], f["worker_exits_not_killed"]
    rows += [
        ("last fault -> last final", f"{f['seconds_last_fault_to_last_final']} s", "report", None),
        ("latency p50 / p95", f"{f['latency_p50_s']} / {f['latency_p95_s']} s", "report", None),
        ("Redis keys without a TTL", str(no_ttl), "0", no_ttl == 0),
        ("workers killed", str(f["workers_killed"]), "report", None),
        ("worker exits nobody caused", str(exits), "0", exits == 0),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print a table each, write JSON; 1 when a target is missed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the CI form: 200 mixed jobs, then 100 each through a Redis restart and a failover",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs of the mixed run (default 1000; quick 200)"
    )
    parser.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "all"),
        default="all",
        help="which run(s): mixed faults, or one Redis event (default: all)",
    )
    args = parser.parse_args(argv)
    mixed_jobs = args.jobs or (200 if args.quick else 1000)
    redis_jobs = 100 if args.quick else 300
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if args.quick and args.scenario == "all":
        chosen = ["mixed", "redis-restart", "sentinel-failover"]
    results: dict[str, Any] = {}
    failed = False
    for scenario in chosen:
        if scenario == "mixed":
            plan = Plan.quick(mixed_jobs) if args.quick else Plan(jobs=mixed_jobs)
        else:
            plan = Plan.redis(scenario, redis_jobs)
        started = time.monotonic()
        figures = run(plan)
        rows = verdicts(figures)
        width = max(len(r[0]) for r in rows)
        print(f"\nchaos {scenario}: {plan.jobs} jobs in {time.monotonic() - started:.0f} s")
        for name, value, target, passed in rows:
            verdict = "" if passed is None else ("PASS" if passed else "MISS")
            print(f"  {name:<{width}}  {value:<36} {target:<10} {verdict}")
        failed = failed or any(passed is False for *_, passed in rows)
        results[scenario] = {"plan": plan.__dict__, "figures": figures}
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"chaos-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"written to {out.relative_to(RESULTS_DIR.parent.parent)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
