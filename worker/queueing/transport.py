"""kombu's Redis transport, hardened: a message that is not a valid envelope is dropped with
an error log instead of stopping the worker.

Upstream kombu decodes each popped item inside the event loop (``_brpop_read``/``_get``); one
item that is not JSON (a broken producer, a stray ``LPUSH``) raises there and Celery treats it
as an unrecoverable error. The item is already popped at that point, so all we can do is say
so loudly, count it, and carry on.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from worker import metrics

log = logging.getLogger(__name__)

_BAD_ENVELOPE = (ValueError, KeyError, TypeError, AttributeError)


def _dropped(exc: BaseException) -> None:
    metrics.MALFORMED_MESSAGES.labels("envelope").inc()
    log.error("dropped a broker message that is not a valid Celery envelope: %r", exc)


class Channel(kombu_redis.Channel):
    """Redis channel that survives undecodable messages."""

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except _BAD_ENVELOPE as exc:
            _dropped(exc)
            return True

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except _BAD_ENVELOPE as exc:
            _dropped(exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    """Use as ``broker_transport = "worker.queueing.transport:Transport"``."""

    Channel = Channel
