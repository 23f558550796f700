"""Prometheus metrics: counters and histograms the tasks update, and a scrape-time collector
of the backlog figures autoscaling and alerts use.

Prefork pool: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty, writable directory) in the
environment before the worker starts. Each pool process then writes its values to a file
there, and the ``/metrics`` server started in the main process merges them. Without it only
the main process's own values would be visible (tasks run in the children).

The figures read from Redis on each scrape (``runcomfy_jobs_in_flight``,
``runcomfy_broker_queue_length``, ``runcomfy_broker_unacked``) are global, so every worker
reports the same value: aggregate them with ``max()``, not ``sum()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api_contracts.messages import ALL_QUEUES
from worker.constants import INFLIGHT_KEY

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: kombu's Redis transport keeps delivered-but-unacknowledged messages (running tasks and
#: held countdowns) in this hash (transport option ``unacked_key``).
KOMBU_UNACKED_KEY: Final = "unacked"

# The value files are opened when the first label-less metric is built below; a missing
# directory would make importing this module fail, so create it (an emptyDir is often empty).
if _multiproc_dir := os.environ.get(MULTIPROC_DIR_ENV):
    os.makedirs(_multiproc_dir, exist_ok=True)

# Queued/upstream waits and generation can last up to the job deadline (30 min by default).
_STAGE_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_STATUS_CALL_BUCKETS: Final = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)

JOBS_FINISHED: Final = Counter(
    "runcomfy_jobs_finished_total", "Jobs that reached a final state.", ["status"]
)
JOB_ERRORS: Final = Counter("runcomfy_job_errors_total", "Job failures by error code.", ["code"])
STAGE_SECONDS: Final = Histogram(
    "runcomfy_stage_seconds",
    "Time spent per job stage (queued, upstream_queue, generation, archive, webhook).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
UPSTREAM_CALLS: Final = Counter(
    "runcomfy_upstream_calls_total",
    "Calls to RunComfy and output downloads, by call and outcome.",
    ["call", "outcome"],
)
STATUS_CALLS_PER_JOB: Final = Histogram(
    "runcomfy_status_calls_per_job",
    "Status requests made for one job before it finished upstream.",
    buckets=_STATUS_CALL_BUCKETS,
)
CHECK_LATENESS: Final = Histogram(
    "runcomfy_status_check_lateness_seconds",
    "How late a status check ran against the time its schedule planned (store clock).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SCHEDULE_CHECKS: Final = Counter(
    "runcomfy_status_checks_total",
    "Status checks by schedule: learned (from run times of earlier jobs) or fallback.",
    ["schedule"],
)
WEBHOOK_ATTEMPTS: Final = Counter(
    "runcomfy_webhook_attempts_total", "Webhook delivery attempts by outcome.", ["outcome"]
)
AMBIGUOUS_SUBMITS: Final = Counter(
    "runcomfy_ambiguous_submits_total",
    "Submits whose outcome upstream is unknown (timeout after sending).",
)
STALE_MESSAGES: Final = Counter(
    "runcomfy_stale_messages_total", "Messages ignored because their seq is stale.", ["task"]
)
RECONCILED: Final = Counter(
    "runcomfy_reconciled_total",
    "Overdue jobs the reconciler moved on, by action (republish, resubmit, fail_deadline …).",
    ["action"],
)
PARKED_WAITS: Final = Counter(
    "runcomfy_parked_waits_total",
    "Long waits parked in the due index instead of held as countdowns, by task.",
    ["task"],
)
SUBMIT_COOLDOWNS: Final = Counter(
    "runcomfy_submit_cooldowns_total",
    "429s from RunComfy that paused every submit of the fleet until their Retry-After.",
)
ACCOUNT_PAUSES: Final = Counter(
    "runcomfy_account_pauses_total",
    "Account errors that paused submissions fleet-wide (circuit opened), by error code.",
    ["code"],
)
STEP_ERRORS: Final = Counter(
    "runcomfy_step_errors_total",
    "Unexpected exceptions raised by a step (retried, then the job fails internal_error).",
    ["task", "exception"],
)
MALFORMED_MESSAGES: Final = Counter(
    "runcomfy_malformed_messages_total",
    "Messages rejected because they failed validation.",
    ["task"],
)
DEAD_LETTERS: Final = Counter(
    "runcomfy_dead_letters_total",
    "Broker messages that could not become a runnable task, moved to the dead-letter list.",
    ["reason"],
)


class JobStoreCollector(Collector):
    """Reads the backlog from Redis on each scrape: jobs in flight, queue lengths, unacked."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Sequence[str] = ALL_QUEUES,
        unacked_key: str = KOMBU_UNACKED_KEY,
    ) -> None:
        self._client = client
        self._queues = tuple(queues)
        self._unacked_key = unacked_key

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not touch Redis (the registry calls collect otherwise)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One pipelined round trip; on a Redis error only ``runcomfy_metrics_redis_up 0``."""
        up = GaugeMetricFamily(
            "runcomfy_metrics_redis_up", "1 if the last scrape could read Redis, else 0."
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(INFLIGHT_KEY)
            for queue in self._queues:
                pipe.llen(queue)
            pipe.hlen(self._unacked_key)
            in_flight, *lengths, unacked = pipe.execute()
        except redis.RedisError as exc:
            # A scrape must not fail because Redis is away: the gap would hide every other metric.
            log.warning("metrics: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "runcomfy_jobs_in_flight", "Jobs accepted and not yet final.", value=in_flight
        )
        queue_length = GaugeMetricFamily(
            "runcomfy_broker_queue_length",
            "Messages waiting in each broker queue (held countdowns are not here).",
            labels=["queue"],
        )
        for queue, length in zip(self._queues, lengths, strict=True):
            queue_length.add_metric([queue], length)
        yield queue_length
        yield GaugeMetricFamily(
            "runcomfy_broker_unacked",
            "Messages delivered to workers and not yet acknowledged, incl. held countdowns.",
            value=unacked,
        )


def build_registry(redis_client: redis.Redis | None = None) -> CollectorRegistry:
    """The registry ``/metrics`` serves: merged per-process files when multiprocess, else the
    default registry; plus the Redis collector when a client is given."""
    # A fresh registry each time, so building twice never registers a collector twice.
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_DIR_ENV):
        # prometheus_client ships no annotations for the multiprocess helpers.
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        # The default registry holds this module's metrics (and process/platform ones).
        registry.register(_Delegate(REGISTRY))
    if redis_client is not None:
        registry.register(JobStoreCollector(redis_client))
    return registry


class _Delegate(Collector):
    """Exposes another registry's metrics through this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """Everything the wrapped registry has right now."""
        return self._registry.collect()


def start_metrics_server(port: int, redis_client: redis.Redis | None = None) -> None:
    """Serve ``/metrics`` on ``port`` in a daemon thread; port 0 disables it.

    Call it once, in the worker's main process (e.g. on ``worker_ready``): the thread does
    not survive a fork, and the children's values reach it through the multiprocess files.
    """
    if port == 0:
        return
    start_http_server(port, registry=build_registry(redis_client))
    log.info("metrics: serving /metrics on port %d", port)


def mark_process_dead(pid: int) -> None:
    """``worker_process_shutdown`` hook: drop a dead pool process's live-gauge files."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
