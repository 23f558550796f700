"""The dead-letter store on a real Redis, the hardened transport's dead-lettering through a
real kombu connection, and the worker consumer's checks and safety net."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import kombu
import pytest
import redis
from prometheus_client import REGISTRY

from api_contracts.messages import QUEUE_POLL, QUEUE_SUBMIT, TASK_POLL
from worker.constants import DEAD_LETTERS_KEY
from worker.devtools.embedded import EmbeddedRedis
from worker.errors import DeadLetterNotFoundError, NotRequeueableError
from worker.metrics import KOMBU_UNACKED_KEY
from worker.queueing import dead_letters
from worker.queueing.consumer import Consumer, task_message_problem
from worker.queueing.dead_letters import REASONS, DeadLetter, DeadLetterStore
from worker.queueing.run import create_app
from worker.settings import RedisSettings, Settings

pytestmark = pytest.mark.integration

TRANSPORT = "worker.queueing.transport:Transport"


@pytest.fixture
def store(redis_client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(redis_client)


def counted(reason: str) -> float:
    value = REGISTRY.get_sample_value("runcomfy_dead_letters_total", {"reason": reason})
    return value or 0.0


# ====================================================================== the store
def test_push_stores_json_with_reason_time_queue_and_raw(
    store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    entry = store.push("invalid_headers", QUEUE_POLL, '{"a": 1}', "timelimit\n must be a list")
    stored = json.loads(redis_client.lindex(DEAD_LETTERS_KEY, 0))  # type: ignore[arg-type]
    assert stored == {
        "id": entry.id,
        "reason": "invalid_headers",
        "at": entry.at,
        "queue": QUEUE_POLL,
        "detail": "timelimit must be a list",
        "raw": '{"a": 1}',
        "raw_bytes": 8,
        "truncated": False,
    }
    assert datetime.fromisoformat(entry.at).utcoffset() is not None
    assert len(entry.id) == 32 and entry.requeueable


def test_entries_newest_first_with_indexes_and_get_by_index_or_id(store: DeadLetterStore) -> None:
    first = store.push("unknown_task", QUEUE_POLL, "one")
    second = store.push("invalid_body", QUEUE_SUBMIT, "two")
    assert store.count() == 2
    assert [(i, e.raw) for i, e in store.entries()] == [(0, "two"), (1, "one")]
    assert [(i, e.raw) for i, e in store.entries(limit=1, start=1)] == [(1, "one")]
    assert store.entries(limit=0) == []
    assert store.get(0) == (0, second)
    assert store.get("1") == (1, first)
    assert store.get(first.id) == (1, first)
    for missing in (2, "7", uuid.uuid4().hex, ""):
        with pytest.raises(DeadLetterNotFoundError):
            store.get(missing)


def test_list_is_capped(redis_client: redis.Redis) -> None:
    small = DeadLetterStore(redis_client, max_entries=3)
    for i in range(5):
        small.push("invalid_body", QUEUE_POLL, f"m{i}")
    assert [e.raw for _, e in small.entries()] == ["m4", "m3", "m2"]


def test_raw_is_capped_and_a_truncated_entry_is_not_requeued(
    redis_client: redis.Redis,
) -> None:
    small = DeadLetterStore(redis_client, max_raw_bytes=10)
    entry = small.push("invalid_body", QUEUE_POLL, "x" * 25)
    assert entry.raw == "x" * 10 and entry.raw_bytes == 25 and entry.truncated
    assert not entry.requeueable
    with pytest.raises(NotRequeueableError, match="cannot be requeued"):
        small.requeue(entry.id)
    assert small.count() == 1 and redis_client.llen(QUEUE_POLL) == 0


def test_requeue_pushes_the_exact_bytes_back_and_removes_the_entry(
    store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    raw = b"\xff\x00 not utf-8 \xe2\x82"
    entry = store.push("undecodable_envelope", QUEUE_POLL, raw)
    other = store.push("unknown_task", QUEUE_SUBMIT, "keep me")
    assert store.requeue(entry.id) == entry
    assert redis_client.lrange(QUEUE_POLL, 0, -1) == [raw]
    assert [e.id for _, e in store.entries()] == [other.id]
    with pytest.raises(DeadLetterNotFoundError):
        store.requeue(entry.id)  # once only
    assert redis_client.llen(QUEUE_POLL) == 1


def test_requeue_by_index(store: DeadLetterStore, redis_client: redis.Redis) -> None:
    store.push("unknown_task", QUEUE_SUBMIT, "older")
    store.push("unknown_task", QUEUE_SUBMIT, "newer")
    assert store.requeue(1).raw == "older"
    assert redis_client.lrange(QUEUE_SUBMIT, 0, -1) == [b"older"]


def test_requeue_all_oldest_first_and_reports_what_it_skipped(
    redis_client: redis.Redis,
) -> None:
    store = DeadLetterStore(redis_client, max_raw_bytes=8)
    store.BATCH = 2  # type: ignore[misc]  # several round trips
    store.push("unknown_task", QUEUE_SUBMIT, "a")
    long = store.push("invalid_body", QUEUE_POLL, "much too long")
    store.push("unknown_task", QUEUE_SUBMIT, "b")
    no_queue = store.push("invalid_body", "", "c")
    store.push("unknown_task", QUEUE_POLL, "d")
    report = store.requeue_all()
    assert [e.raw for e in report.requeued] == ["a", "b", "d"]
    assert [e.id for e in report.skipped] == [long.id, no_queue.id]
    # LPUSH, consumers BRPOP: the oldest is consumed first
    assert redis_client.lrange(QUEUE_SUBMIT, 0, -1) == [b"b", b"a"]
    assert redis_client.lrange(QUEUE_POLL, 0, -1) == [b"d"]
    assert {e.id for _, e in store.entries()} == {long.id, no_queue.id}
    assert store.requeue_all().requeued == []


def test_purge(store: DeadLetterStore) -> None:
    assert store.purge() == 0
    for _ in range(3):
        store.push("invalid_body", QUEUE_POLL, "x")
    assert store.purge() == 3 and store.count() == 0


def test_foreign_entries_are_shown_not_requeued(
    store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    redis_client.lpush(DEAD_LETTERS_KEY, b"pushed by hand")
    (_, entry), = store.entries()  # fmt: skip
    assert entry.raw == "pushed by hand" and not entry.requeueable
    assert DeadLetter.from_json(json.dumps({"reason": "x", "raw_bytes": "many"})).raw_bytes == 0


def test_record_counts_and_logs(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    before = counted("unknown_task")
    entry = dead_letters.record(redis_client, "unknown_task", QUEUE_POLL, "raw", "no such task")
    assert counted("unknown_task") == before + 1
    assert DeadLetterStore(redis_client).get(entry.id)[1] == entry
    assert entry.id in caplog.text and "unknown_task" in caplog.text
    assert set(REASONS) == {
        "undecodable_envelope", "invalid_headers", "unknown_task", "invalid_body", "internal_error",
    }  # fmt: skip


# ====================================================================== the transport
def envelope(tag: str | None = None, **headers: Any) -> dict[str, Any]:
    tag = tag or str(uuid.uuid4())
    body = json.dumps([["job", 1], {}, {"callbacks": None}]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": TASK_POLL, "id": tag, "timelimit": [None, None]}
        | headers,
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": QUEUE_POLL},
            "delivery_tag": tag,
            "body_encoding": "base64",
            "priority": 0,
        },
    }


@pytest.fixture
def connection(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Any]:
    conn = kombu.Connection(redis_server.url, transport=TRANSPORT)
    yield conn
    conn.release()


def consume(conn: Any, on_message: Any, queue: str = QUEUE_POLL) -> Any:
    channel = conn.channel()
    q = kombu.Queue(queue, kombu.Exchange("runcomfy", "direct"), routing_key=queue)
    q(channel).declare()
    consumer = kombu.Consumer(channel, queues=[q], on_message=on_message, accept=["json"])
    consumer.consume()
    return channel


def drain(conn: Any, times: int = 1) -> None:
    for _ in range(times):
        conn.drain_events(timeout=2)


@pytest.mark.parametrize(
    "item",
    [
        b"\x00not json \xff",
        b'"a JSON string"',
        b'{"body": "!!!", "headers": {}, "properties": {}}',
        json.dumps({**envelope(), "properties": {"delivery_tag": "t"}}).encode(),
        json.dumps({**envelope(), "body": "not base64 at all!"}).encode(),
    ],
    ids=["not-json", "not-an-object", "no-delivery-tag", "no-delivery-info", "bad-base64"],
)
def test_transport_dead_letters_undecodable_items(
    connection: Any, redis_client: redis.Redis, item: bytes
) -> None:
    delivered: list[Any] = []
    consume(connection, delivered.append)
    redis_client.lpush(QUEUE_POLL, item)
    good = envelope()
    redis_client.lpush(QUEUE_POLL, json.dumps(good))
    drain(connection, 2)
    assert [m.delivery_tag for m in delivered] == [good["properties"]["delivery_tag"]]
    (_, entry), = DeadLetterStore(redis_client).entries()  # fmt: skip
    assert entry.reason == "undecodable_envelope" and entry.queue == QUEUE_POLL
    if item.startswith(b"\x00") or item.startswith(b'"'):
        assert entry.raw_message() == item
    else:
        assert json.loads(entry.raw) == json.loads(item)
    assert redis_client.hlen(KOMBU_UNACKED_KEY) == 1  # only the good one, not acked here


def test_transport_dead_letters_and_acks_what_a_consumer_raises_on(
    connection: Any, redis_client: redis.Redis
) -> None:
    seen: list[str | None] = []

    def explode(message: Any) -> None:
        seen.append(channel.delivering_queue)
        raise TypeError("cannot unpack non-iterable int object")

    channel = consume(connection, explode)
    msg = envelope(timelimit=5)
    redis_client.lpush(QUEUE_POLL, json.dumps(msg))
    drain(connection)
    assert seen == [QUEUE_POLL] and channel.delivering_queue is None
    assert redis_client.hlen(KOMBU_UNACKED_KEY) == 0
    assert redis_client.zcard("unacked_index") == 0
    (_, entry), = DeadLetterStore(redis_client).entries()  # fmt: skip
    assert entry.reason == "internal_error" and "cannot unpack" in entry.detail
    assert json.loads(entry.raw) == msg


# ====================================================================== the consumer
def fake(headers: Any, payload: Any = None, exc: Exception | None = None) -> Any:
    class Message(SimpleNamespace):
        @property
        def payload(self) -> Any:
            if exc is not None:
                raise exc
            return payload

    return Message(headers=headers)


REGISTERED = {TASK_POLL: object()}
GOOD_BODY = [["job", 1], {}, {"callbacks": None}]


@pytest.mark.parametrize(
    ("headers", "payload", "expected"),
    [
        ({"task": TASK_POLL, "id": "t", "timelimit": [None, None]}, GOOD_BODY, None),
        ({"task": TASK_POLL, "id": "t", "timelimit": [30, 10.5]}, GOOD_BODY, None),
        ({"task": TASK_POLL, "id": "t"}, {"args": [1], "kwargs": {}}, None),  # hybrid
        ({"task": "runcomfy.nope", "id": "t"}, None, None),  # left to Celery's own hook
        (None, GOOD_BODY, "invalid_headers"),
        (["task"], GOOD_BODY, "invalid_headers"),
        ({"id": "t"}, GOOD_BODY, "invalid_headers"),
        ({"task": ["x"], "id": "t"}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": 7}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": "t", "timelimit": 5}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": "t", "timelimit": [1]}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": "t", "timelimit": ["1", None]}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": "t", "timelimit": [True, None]}, GOOD_BODY, "invalid_headers"),
        ({"task": TASK_POLL, "id": "t"}, {"a": 1}, "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, [[], {}], "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, "text", "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, 42, "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, ["x", {}, None], "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, [[], [], None], "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, [[], {}, 3], "invalid_body"),
        ({"task": TASK_POLL, "id": "t"}, {"args": [], "kwargs": [1]}, "invalid_body"),
    ],
)
def test_task_message_problem(headers: Any, payload: Any, expected: str | None) -> None:
    problem = task_message_problem(fake(headers, payload), REGISTERED)
    assert (problem[0] if problem else None) == expected, problem


def test_task_message_problem_undecodable_body() -> None:
    from kombu.exceptions import ContentDisallowed, DecodeError

    for exc in (DecodeError("bad json"), ContentDisallowed("pickle")):
        problem = task_message_problem(fake({"task": TASK_POLL, "id": "t"}, exc=exc), REGISTERED)
        assert problem is not None and problem[0] == "invalid_body"


@pytest.fixture
def worker_consumer(redis_server: EmbeddedRedis) -> Iterator[tuple[Consumer, list[Any]]]:
    """Celery's consumer class as the worker uses it, with a pool that explodes."""
    app = create_app(Settings(redis=RedisSettings(url=redis_server.url)))
    requests: list[Any] = []

    def explode(request: Any) -> None:
        requests.append(request)
        raise RuntimeError("pool exploded")

    consumer = Consumer(
        on_task_request=explode, app=app, hostname="test@dead-letters", pool=MagicMock(),
        controller=MagicMock(), timer=MagicMock(), hub=None,
    )  # fmt: skip
    consumer.update_strategies()
    yield consumer, requests
    app.close_runtime()
    app.close()


def test_consumer_dead_letters_and_acks_what_celery_raises_on(
    worker_consumer: tuple[Consumer, list[Any]], connection: Any, redis_client: redis.Redis
) -> None:
    from celery.worker import state

    consumer, requests = worker_consumer
    consume(connection, consumer.create_task_handler())
    msg = envelope()
    redis_client.lpush(QUEUE_POLL, json.dumps(msg))
    drain(connection)
    assert len(requests) == 1  # it got as far as the pool
    assert redis_client.hlen(KOMBU_UNACKED_KEY) == 0
    assert requests[0] not in state.reserved_requests
    (_, entry), = DeadLetterStore(redis_client).entries()  # fmt: skip
    assert entry.reason == "internal_error" and entry.queue == QUEUE_POLL
    assert "pool exploded" in entry.detail and json.loads(entry.raw) == msg


def test_consumer_checks_before_celery_reserves_anything(
    worker_consumer: tuple[Consumer, list[Any]], connection: Any, redis_client: redis.Redis
) -> None:
    consumer, requests = worker_consumer
    consume(connection, consumer.create_task_handler())
    redis_client.lpush(QUEUE_POLL, json.dumps(envelope(timelimit=5)))
    redis_client.lpush(QUEUE_POLL, json.dumps(envelope(task="runcomfy.nope")))
    drain(connection, 2)
    assert requests == []
    assert redis_client.hlen(KOMBU_UNACKED_KEY) == 0
    reasons = [e.reason for _, e in DeadLetterStore(redis_client).entries()]
    assert reasons == ["unknown_task", "invalid_headers"]


def test_consumer_leaves_the_message_unacked_when_redis_refuses_the_dead_letter(
    worker_consumer: tuple[Consumer, list[Any]],
    connection: Any,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, requests = worker_consumer

    def refuse(*_: Any, **__: Any) -> None:
        raise redis.ResponseError("OOM command not allowed")

    monkeypatch.setattr(dead_letters, "record", refuse)
    consume(connection, consumer.create_task_handler())
    redis_client.lpush(QUEUE_POLL, json.dumps(envelope(timelimit=5)))
    drain(connection)
    # not lost: kombu restores it after the visibility timeout
    assert redis_client.hlen(KOMBU_UNACKED_KEY) == 1
    assert requests == []
