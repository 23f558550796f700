"""The floors the service is measured against: a tiny Celery app on the same broker settings.

``celery -A bench.baseline_app worker -P threads -c 8`` (started by the benchmarks with the
stack's environment; ``REDIS_URL`` names the broker) runs:

* ``bench.hop``: a bare chain. Each hop publishes the next one (countdown 0) onto the queue of
  the matching service step (submit → poll → archive → notify); the last hop counts the chain
  as done with one ``INCR``. No other I/O: what Celery on Redis costs per hop, nothing else.
* ``bench.noop``: does nothing (the raw ``delay()`` enqueue floor; never consumed there).
* ``bench.naive_poll``: the design the service avoids. It submits upstream, then loops
  ``time.sleep(poll)`` + a status call *inside the task*, so one pool slot is busy for the
  whole generation: a threads pool of 8 holds 8 generations in flight, no more.
* ``bench.poll_floor``: the poll-capacity floor. One status GET for a request id (one
  ``httpx.Client`` per process, reused), then the next check of the same id published at
  once (countdown 0) onto the poll queue: what one status check over Celery on Redis costs
  with nothing else (no job record, no schedule, no validation).

The configuration is the service's own (``worker.queueing.config.celery_config``: hardened
transport, acks_late, prefetch 1, the same four queues), so the only difference is the tasks.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import httpx
import redis
from celery import Celery

from api_contracts.messages import ALL_QUEUES, QUEUE_POLL
from bench.common import CHAIN_DONE_KEY, NAIVE_ACTIVE_KEY
from worker.queueing.config import celery_config
from worker.settings import load_settings

HOPS = len(ALL_QUEUES)
MODEL_PATH = "/v1/models/bytedance/dreamina-4-0/text-to-image"

_settings = load_settings()
app = Celery("bench_baseline")
app.conf.update(celery_config(_settings))
app.conf.task_routes = {
    "bench.noop": {"queue": ALL_QUEUES[0], "routing_key": ALL_QUEUES[0]},
    "bench.naive_poll": {"queue": ALL_QUEUES[0], "routing_key": ALL_QUEUES[0]},
    "bench.poll_floor": {"queue": QUEUE_POLL, "routing_key": QUEUE_POLL},
}
FINAL_STATUSES = ("completed", "failed", "cancelled")

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _redis() -> redis.Redis:
    client = _clients.get("redis")
    if client is None:
        client = _clients["redis"] = redis.Redis.from_url(_settings.redis.url)
    return client


def _http() -> httpx.Client:
    """This process's upstream client (threads share it), built on first use."""
    client = _clients.get("http")
    if client is None:
        with _clients_lock:
            client = _clients.get("http")
            if client is None:
                upstream = _settings.runcomfy
                token = upstream.api_token.get_secret_value() if upstream.api_token else ""
                client = _clients["http"] = httpx.Client(
                    base_url=upstream.base_url,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=httpx.Timeout(
                        upstream.read_timeout_s, connect=upstream.connect_timeout_s
                    ),
                )
    return client


@app.task(name="bench.hop")
def hop(chain_id: int, n: int) -> None:
    """Hop ``n`` (1-based) of a chain: publish hop n+1 to the next queue, or count it done."""
    if n >= HOPS:
        _redis().incr(CHAIN_DONE_KEY)
        return
    queue = ALL_QUEUES[n]
    app.send_task("bench.hop", args=[chain_id, n + 1], queue=queue, routing_key=queue)


@app.task(name="bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    """Nothing: the enqueue floor."""


@app.task(name="bench.naive_poll")
def naive_poll(prompt: str, poll_s: float, max_s: float) -> str:
    """Submit, then sleep-and-poll inside the task until done (or ``max_s``)."""
    base = os.environ["RUNCOMFY_BASE_URL"]
    token = os.environ["RUNCOMFY_API_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + max_s
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        body = {"prompt": prompt, "size": "1024x1024", "force_single": True}
        request_id = client.post(MODEL_PATH, json=body).json()["request_id"]
        _redis().sadd(NAIVE_ACTIVE_KEY, request_id)
        try:
            while time.monotonic() < deadline:
                time.sleep(poll_s)
                status = client.get(f"/v1/requests/{request_id}/status").json()["status"]
                if status in FINAL_STATUSES:
                    return str(status)
        finally:
            _redis().srem(NAIVE_ACTIVE_KEY, request_id)
    return "gave_up"


@app.task(name="bench.poll_floor")
def poll_floor(request_id: str, until: float) -> None:
    """One status check of ``request_id``, then the next one at once (countdown 0) on the
    poll queue, until the request ends or the epoch time ``until`` has passed."""
    answer = _http().get(f"/v1/requests/{request_id}/status")
    answer.raise_for_status()
    if answer.json()["status"] in FINAL_STATUSES or time.time() >= until:
        return
    poll_floor.apply_async(args=(request_id, until), countdown=0)
