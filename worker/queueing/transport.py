"""kombu's Redis transport, hardened: a popped item that is not a valid kombu envelope is
dead-lettered (see :mod:`worker.queueing.dead_letters`) instead of stopping the worker, and
nothing a consumer callback raises can leave a message in ``unacked``.

Upstream kombu decodes each popped item inside the event loop (``_brpop_read``/``_get``); an
item that is not JSON (a broken producer, a stray ``LPUSH``) raises there and Celery treats it
as an unrecoverable error (celery/celery#1113, and kombu#2421 for the same on SQS). The item
is already popped by then and was never in ``unacked``: the only copy left is the one we
store as a dead letter.

Messages that are valid envelopes but not runnable tasks are Celery's business; the worker's
consumer (:mod:`worker.queueing.consumer`) dead-letters and acks those. This module records,
while the consumer callback runs, which queue the message was popped from
(``channel.delivering_queue``), so a dead letter can be requeued exactly where it came from.

The previous version of this module caught ``TypeError``/``ValueError``/``KeyError`` around
the whole ``_brpop_read``, which includes the consumer callback: a message Celery choked on
was logged as "dropped" but stayed in ``unacked`` (``qos.append`` runs before the callback),
holding a prefetch slot for good and poisoning the next worker after the visibility timeout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker import metrics
from worker.queueing import dead_letters

log = logging.getLogger(__name__)

#: Name of the channel attribute holding the queue of the message being delivered.
DELIVERING_QUEUE_ATTR = "delivering_queue"

#: What decoding an item or building a kombu Message from it raises when it is not a valid
#: envelope (JSON errors are ValueErrors; bad base64 is binascii.Error, a ValueError).
_BAD_ENVELOPE = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def _envelope(payload: object) -> dict[str, Any]:
    """``payload`` if it has what kombu's Redis channel needs to deliver and ack it."""
    if not isinstance(payload, dict):
        raise TypeError(f"envelope is a {type(payload).__name__}, not an object")
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not properties.get("delivery_tag"):
        raise KeyError("properties.delivery_tag")
    info = properties.get("delivery_info")
    # kombu's QoS.append reads delivery_info['exchange'] / ['routing_key'] to store it unacked
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        raise KeyError("properties.delivery_info.exchange/routing_key")
    return payload


class Channel(kombu_redis.Channel):
    """Redis channel that dead-letters undecodable items."""

    #: The queue of the message whose consumer callback is running, else None
    #: (read by :func:`worker.queueing.consumer.delivery_queue`).
    delivering_queue: str | None = None

    # ------------------------------------------------------------------ one client per pool
    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, but reusing one client object per connection pool. kombu 5.7 builds a
        new ``redis.Redis`` for every command it sends outside the event loop (the unacked
        bookkeeping on delivery, each publish, each ack: three per status check), and
        redis-py 8 rebuilds ~170 response callbacks in each constructor: 7-10 % of a
        worker's CPU per check (``python -m bench.profile_poll``). A client object holds no
        connection of its own (each command takes one from the pool), so sharing it across
        threads is what redis-py intends; a new pool (after a reconnect) gets a new one."""
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_shared_client")
        if cached is None or cached.connection_pool is not pool:
            cached = self._create_client()  # type: ignore[attr-defined]
            self.__dict__["_shared_client"] = cached
        yield cached

    # ------------------------------------------------------------------ surviving a restart
    def _connparams(self, asynchronous: bool = False) -> Any:
        """kombu's connection parameters, remembered for after the transport is collected.

        On a lost connection Celery 5.7 first ``collect()``s the connection (which sets the
        transport's ``client`` to None), then closes it; closing the channel restores its
        unacked messages through a new pool built from ``self.connection.client``, and
        ``None.hostname`` raised AttributeError, which ``ignore_errors`` does not catch: the
        worker logged "Unrecoverable error" and exited with status 0 on every Redis restart
        (the same failure as celery/kombu#970 and #582). With the parameters remembered the
        restore either works (Redis is back) or raises a connection error, which Celery
        expects, and the worker reconnects."""
        saved: dict[bool, dict[str, Any]] = self.__dict__.setdefault("_rcw_connparams", {})
        if getattr(self.connection, "client", None) is None and asynchronous in saved:
            return dict(saved[asynchronous])
        params = super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]
        saved[asynchronous] = dict(params)
        return params

    # ------------------------------------------------------------------ decoding
    def _brpop_read(self, **options: Any) -> Any:
        """kombu 5.7's ``_brpop_read`` with the decoding guarded (kept line for line otherwise)."""
        chan: Any = self  # kombu's private attributes are not in its stubs
        try:
            try:
                client = chan.client
                dest__item = client.parse_response(client.connection, "BRPOP", **options)
            except chan.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                chan.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(chan.sep, 1)[0]
            chan._queue_cycle.rotate(dest)
            payload = self._decode(dest, item)
            if payload is not None:
                chan.connection._deliver(payload, dest)
            return True
        finally:
            chan._in_poll = None
            flush = getattr(chan, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """kombu's ``_get`` (polling, ``basic_get``) with the decoding guarded."""
        chan: Any = self
        with chan.conn_or_acquire() as client:
            for pri in chan.priority_steps:
                item = client.rpop(chan._q_for_pri(queue, pri))
                if item:
                    chan._maybe_update_queues_expire(client, queue)
                    payload = self._decode(queue, item)
                    if payload is None:
                        raise Empty()
                    return payload
            chan._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _decode(self, queue: str, item: bytes | str) -> dict[str, Any] | None:
        """The envelope in ``item``, or None after dead-lettering it."""
        try:
            return _envelope(loads(bytes_to_str(item)))
        except _BAD_ENVELOPE as exc:
            self._dead_letter(queue, item, exc)
            return None

    def _dead_letter(
        self, queue: str, raw: bytes | str | dict[str, Any], exc: BaseException
    ) -> None:
        metrics.MALFORMED_MESSAGES.labels("envelope").inc()
        text: bytes | str = raw if isinstance(raw, bytes | str) else _dumps(raw)
        detail = f"not a kombu envelope: {type(exc).__name__}: {exc}"
        try:
            with self.conn_or_acquire() as client:
                dead_letters.record(client, "undecodable_envelope", queue, text, detail)
        except Exception:
            # The item is already popped: this log line is all that is left of it.
            log.exception(
                "dropped an undecodable message from %s (could not store the dead letter): %r",
                queue,
                text[:1024],
            )

    # ------------------------------------------------------------------ delivering
    def basic_consume(
        self,
        queue: str,
        no_ack: bool,
        callback: Callable[..., Any] | None,
        consumer_tag: str | None,
        **kwargs: Any,
    ) -> Any:
        """kombu's ``basic_consume``, with a delivery callback that never leaves a message
        unacked because the consumer raised, and that records the queue while it runs."""
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if callback is None:
            return result
        chan: Any = self
        transport = chan.connection
        connection_errors = (*transport.connection_errors, *transport.channel_errors)

        def _callback(raw_message: dict[str, Any]) -> Any:
            try:
                message = chan.Message(raw_message, channel=self)
            except _BAD_ENVELOPE as exc:  # e.g. a body that is not base64: never in unacked
                self._dead_letter(queue, raw_message, exc)
                return None
            if not no_ack:
                chan.qos.append(message, message.delivery_tag)
            self.delivering_queue = queue
            try:
                return callback(message)
            except connection_errors:
                raise
            except Exception as exc:
                # The worker's consumer dead-letters what Celery cannot run; this is the net
                # under it (and under any other consumer): never a poison message in unacked.
                log.exception("a consumer raised on a message from %s; dead-lettering it", queue)
                self._dead_letter_delivered(queue, message, no_ack, exc)
                return None
            finally:
                self.delivering_queue = None

        chan.connection._callbacks[queue] = _callback
        return result

    def _dead_letter_delivered(
        self, queue: str, message: Any, no_ack: bool, exc: BaseException
    ) -> None:
        detail = f"{type(exc).__name__}: {exc}"
        try:
            with self.conn_or_acquire() as client:
                dead_letters.record(client, "internal_error", queue, _dumps(message._raw), detail)
        except Exception:
            log.exception("could not store a dead letter; the message stays unacked")
            return
        if not no_ack and not message.acknowledged:
            message.ack()


def _dumps(value: object) -> str:
    try:
        return str(dumps(value))
    except (TypeError, ValueError):
        return repr(value)


class Transport(kombu_redis.Transport):
    """Use as ``broker_transport = "worker.queueing.transport:Transport"``."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The hardened channel on a Sentinel group (``sentinel://…`` with ``master_name``)."""

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # kombu builds a Sentinel pool from ``connection.client.alt``, which Celery 5.7's
        # collect() has set to None by the time it closes the channel (see
        # Channel._connparams): a connection error is what Celery expects there. The unacked
        # messages stay in Redis; the job store's reconciler moves their jobs on.
        if getattr(self.connection, "client", None) is None:
            raise redis.exceptions.ConnectionError("broker connection already collected")
        return super()._get_pool(asynchronous)  # type: ignore[misc]


class SentinelTransport(kombu_redis.SentinelTransport):
    """Use as ``broker_transport = "worker.queueing.transport:SentinelTransport"``."""

    Channel = SentinelChannel
