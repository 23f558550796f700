"""Celery's worker consumer, made to dead-letter every message it cannot turn into a task.

Installed with ``worker_consumer = "worker.queueing.consumer:Consumer"``.

Why: Celery's ``on_task_received`` (celery/worker/consumer/consumer.py, ``create_task_handler``)
catches only ``InvalidTaskError``, ``ContentDisallowed`` and ``DecodeError``. A message whose
headers or body Celery does not expect raises anything else from deep inside: a
``"timelimit": 5`` header fails at ``time_limit, soft_time_limit = self.time_limits`` in
``Request.execute_using_pool`` (celery/worker/request.py), a body that is not
``[args, kwargs, embed]`` at the unpacking in ``Request.__init__``, a missing ``id`` header
with a ``KeyError``. By then kombu has put the message in ``unacked`` and counted it against
the prefetch limit (kombu/transport/virtual/base.py, ``basic_consume._callback``:
``qos.append`` before the callback), and the request is in Celery's reserved set. Nothing
ever acks it: it holds a prefetch slot until the worker stops, comes back after the
visibility timeout and does the same to the next worker (with ``-c 2`` two such messages
stop a worker for good while its event loop, and so its liveness probe, stays healthy).
Upstream: celery/celery#7975 (a message not in the proper format kills the worker) and
celery/celery#4308 (uncaught ``DecodeError`` from the strategy); still open.

So, before Celery sees a message, :func:`task_message_problem` checks what Celery would
choke on; a message that fails is dead-lettered and acked. The message Celery already
rejects itself (unknown task, bad ETA, undecodable body) is dead-lettered in its own hooks
before Celery rejects it. Whatever still raises is dead-lettered as ``internal_error``,
forgotten by Celery's state and acked.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import redis
from celery.exceptions import InvalidTaskError
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.json import dumps as kombu_dumps
from vine import promise as vine_promise

from worker.queueing import dead_letters
from worker.queueing.config import ServiceCelery
from worker.queueing.dead_letters import Reason
from worker.queueing.transport import DELIVERING_QUEUE_ATTR

log = logging.getLogger(__name__)


def task_message_problem(
    message: Any, registered: Mapping[str, object]
) -> tuple[Reason, str] | None:
    """``(reason, detail)`` when Celery could not run ``message`` safely, else None.

    Checks only what Celery does not check itself before reserving the task (an unknown task
    name, a bad ETA or expires are left to Celery, whose hooks below dead-letter them)."""
    headers = message.headers
    if not isinstance(headers, Mapping):
        return "invalid_headers", f"headers are not a mapping: {type(headers).__name__}"
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        return "invalid_headers", f"header 'task' must be a task name (protocol 2), got {task!r}"
    if task not in registered:
        return None  # Celery's on_unknown_task (dead-letters, then rejects)
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "invalid_headers", f"header 'id' must be a non-empty string, got {task_id!r}"
    problem = _timelimit_problem(headers.get("timelimit"))
    if problem:
        return "invalid_headers", problem
    try:
        payload = message.payload  # decoded once; Celery's strategy reuses it
    except (DecodeError, ContentDisallowed) as exc:
        return "invalid_body", f"{type(exc).__name__}: {exc}"
    return _body_problem(payload)


def _timelimit_problem(value: object) -> str | None:
    if value is None:
        return None
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(v is None or (_number(v) and v >= 0) for v in value)
    ):
        return None
    return f"header 'timelimit' must be [hard, soft] (seconds or null), got {value!r}"


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _body_problem(payload: object) -> tuple[Reason, str] | None:
    if isinstance(payload, Mapping) and "args" in payload:  # hybrid protocol 1/2 body
        args, kwargs = payload.get("args"), payload.get("kwargs", {})
    elif isinstance(payload, list | tuple) and len(payload) == 3:
        args, kwargs, embed = payload
        if embed is not None and not isinstance(embed, Mapping):
            return "invalid_body", f"body[2] (embed) must be an object, got {type(embed).__name__}"
    else:
        shape = (
            f"{type(payload).__name__} of {len(payload)}"
            if isinstance(payload, list | tuple | Mapping | str)
            else type(payload).__name__
        )
        return "invalid_body", f"body must be [args, kwargs, embed], got a {shape}"
    if not isinstance(args, list | tuple):
        return "invalid_body", f"args must be an array, got {type(args).__name__}"
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        return "invalid_body", "kwargs must be an object"
    return None


def raw_text(message: Any) -> str:
    """The message as it was popped from the queue (kombu keeps the decoded envelope)."""
    raw = getattr(message, "_raw", None)
    if raw is None:  # not a virtual-transport message: rebuild an envelope
        body = message.body
        raw = {
            "body": base64.b64encode(
                body if isinstance(body, bytes) else str(body).encode()
            ).decode("ascii"),
            "content-encoding": message.content_encoding,
            "content-type": message.content_type,
            "headers": message.headers,
            "properties": {**(message.properties or {}), "body_encoding": "base64"},
        }
    try:
        return str(kombu_dumps(raw))
    except (TypeError, ValueError):
        return repr(raw)


def delivery_queue(message: Any) -> str:
    """The queue the message came from: exact with the hardened transport, else the
    routing key (the queue's name in this service)."""
    queue = getattr(message.channel, DELIVERING_QUEUE_ATTR, None)
    if queue:
        return str(queue)
    info = message.delivery_info or {}
    return str(info.get("routing_key") or "")


class Consumer(CeleryConsumer):
    """Celery's consumer; every message it cannot run ends in the dead-letter list, acked."""

    def create_task_handler(self, promise: type[vine_promise] = vine_promise) -> Callable[..., Any]:
        """Wrap Celery's handler: check first, dead-letter what fails or raises."""
        celery_handler = super().create_task_handler(promise)
        strategies: Mapping[str, object] = self.strategies  # type: ignore[attr-defined]
        connection_errors = tuple(self.connection_errors)  # type: ignore[attr-defined]

        def on_task_received(message: Any) -> Any:
            problem = task_message_problem(message, strategies)
            if problem is not None:
                if self._dead_letter(message, *problem):
                    message.ack_log_error(log, connection_errors)
                return None
            try:
                return celery_handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                log.exception("taking in a message raised; dead-lettering it")
                _forget(message)
                detail = f"{type(exc).__name__}: {exc}"
                stored = self._dead_letter(message, "internal_error", detail)
                if stored and not message.acknowledged:
                    message.ack_log_error(log, connection_errors)
                return None

        return on_task_received

    # Celery's own hooks log and then ack/reject: keep a copy first (and when the copy cannot
    # be stored, leave the message unacked rather than lose it).
    def on_unknown_message(self, body: Any, message: Any) -> None:
        """No task header and not protocol 1 either."""
        if self._dead_letter(message, "invalid_headers", "not a Celery task message"):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task name this worker does not register."""
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        detail = f"no task named {headers.get('task')!r} is registered"
        if self._dead_letter(message, "unknown_task", detail):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Celery's InvalidTaskError (bad ETA or expires …) or ContentDisallowed."""
        body_error = isinstance(exc, ContentDisallowed) or (
            isinstance(exc, InvalidTaskError) and "arguments" in str(exc)
        )
        reason: Reason = "invalid_body" if body_error else "invalid_headers"
        if self._dead_letter(message, reason, f"{type(exc).__name__}: {exc}"):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """The body cannot be decoded (Celery acks it)."""
        if self._dead_letter(message, "invalid_body", f"{type(exc).__name__}: {exc}"):
            super().on_decode_error(message, exc)

    def _dead_letter(self, message: Any, reason: Reason, detail: str) -> bool:
        """Store the message as a dead letter. False when Redis refuses: the message then
        stays unacked (kombu restores it after the visibility timeout) instead of being lost."""
        try:
            client = self._dead_letter_client()
            raw = raw_text(message)
            dead_letters.record(client, reason, delivery_queue(message), raw, detail)
        except Exception:
            log.exception("could not store a dead letter (%s); the message stays unacked", reason)
            return False
        return True

    def _dead_letter_client(self) -> redis.Redis:
        app = self.app
        if isinstance(app, ServiceCelery):
            return app.runtime.redis  # the job store's client: REDIS_URL is also the broker
        client: redis.Redis | None = getattr(self, "_rcw_dead_letter_client", None)
        if client is None:
            client = redis.Redis.from_url(str(app.conf.broker_url))
            self._rcw_dead_letter_client = client
        return client


def _forget(message: Any) -> None:
    """Drop Celery's bookkeeping of requests built from ``message`` (reserved, scheduled,
    active), and cancel a countdown timer already set for one."""
    scheduled = getattr(state, "scheduled_requests", ())  # Celery 5.6+, not in the stubs
    pools = (state.reserved_requests, state.active_requests, scheduled)
    for req in {r for pool in pools for r in list(pool)}:
        if getattr(req, "message", None) is message:
            timer_entry = getattr(req, "_eta_timer_entry", None)
            if timer_entry is not None:
                timer_entry.cancel()
            state.task_ready(req)
