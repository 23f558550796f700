"""The Celery configuration (queues, routing, transport options) and the app class that
carries one Runtime per process.

Light on purpose: producers import it to publish, so it imports no task and no step; the
app with tasks and signals is built by :func:`worker.queueing.run.create_app`.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from api_contracts.messages import ALL_QUEUES, QUEUE_FOR_TASK
from worker.runtime import Runtime
from worker.services.redis_client import broker_options, broker_url
from worker.settings import Settings

log = logging.getLogger(__name__)


class ServiceCelery(Celery):
    """Celery app that carries the service settings and one Runtime per process."""

    settings: Settings

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__("runcomfy_worker", **kwargs)
        self.settings = settings
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        """This process's Runtime (rebuilt after a fork)."""
        rt = self._runtime
        if rt is None or rt.pid != os.getpid():
            with self._runtime_lock:
                rt = self._runtime
                if rt is None or rt.pid != os.getpid():
                    rt = Runtime(self.settings)
                    self._runtime = rt
        return rt

    def close_runtime(self) -> None:
        """Close this process's clients (worker shutdown)."""
        with self._runtime_lock:
            if self._runtime is not None and self._runtime.pid == os.getpid():
                self._runtime.close()
            self._runtime = None


def _transport(settings: Settings) -> str | None:
    if settings.redis.is_sentinel:
        return "worker.queueing.transport:SentinelTransport"
    if settings.redis.url.startswith("redis://"):
        return "worker.queueing.transport:Transport"
    return None


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from settings (see shared notes on Celery over Redis)."""
    visibility = settings.broker.visibility_timeout_s
    sweep = settings.broker.restore_sweep_s
    # kombu sweeps unacked messages every interval x throttle seconds; keep the product.
    throttle = 10 if sweep >= 10 else 1
    transport = {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(1, round(sweep / throttle)),
        "unacked_restore_throttle": throttle,
        **broker_options(settings.redis),
    }
    exchange = Exchange("runcomfy", type="direct")
    return {
        "broker_url": broker_url(settings.redis),
        # redis:// and sentinel:// get the hardened transports; rediss:// keeps kombu's own.
        "broker_transport": _transport(settings),
        "broker_use_ssl": (
            {"ssl_cert_reqs": ssl.CERT_REQUIRED}
            if settings.redis.is_sentinel and settings.redis.tls
            else None
        ),
        # Dead-letters (and acks) every message it cannot turn into a runnable task, instead of
        # leaving it in `unacked` (see worker/queueing/consumer.py).
        "worker_consumer": "worker.queueing.consumer:Consumer",
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        # Every task is idempotent (seq + compare-and-set), so a lost worker may redeliver.
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_eta_task_limit": settings.worker.eta_task_limit,
        "worker_soft_shutdown_timeout": settings.worker.soft_shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": settings.worker.send_task_events,
        "task_send_sent_event": settings.worker.send_task_events,
        "worker_hijack_root_logger": False,
        "task_queues": [Queue(q, exchange, routing_key=q) for q in ALL_QUEUES],
        "task_default_queue": ALL_QUEUES[0],
        "task_default_exchange": "runcomfy",
        "task_routes": {
            name: {"queue": queue, "routing_key": queue} for name, queue in QUEUE_FOR_TASK.items()
        },
        "task_create_missing_queues": False,
        "worker_disable_rate_limits": True,
    }
