"""Webhook URLs that delivery could never resolve are refused at submit, on a real Redis."""

from __future__ import annotations

import pytest

from api_contracts.messages import QUEUE_SUBMIT
from worker.errors import InvalidRequestError
from worker.producer.producer import Producer

pytestmark = pytest.mark.integration

LONG_HOST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])  # 254 characters


def nothing_queued(producer: Producer) -> bool:
    return producer.rt.redis.llen(QUEUE_SUBMIT) == 0 and producer.rt.store.in_flight() == 0


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (
            "a" * 64 + ".example.com",
            "host label 'aaaaaaaaaaaaaaaaaaaa…' is 64 characters; DNS allows at most 63",
        ),
        (LONG_HOST, "host 'aaaaaaaaaaaaaaaaaaaa…' is 254 characters; DNS allows at most 253"),
        ("hooks..example.com", "host 'hooks..example.com' has an empty label"),
        ("\u05d0a.example", "host label '\u05d0a' fails IDNA encoding: Violation of BIDI"),
    ],
)
def test_enqueue_refuses_the_webhook_url_with_a_field_error(
    producer: Producer, host: str, reason: str
) -> None:
    request = {"input": {"prompt": "p"}, "webhook_url": f"https://{host}/hook"}

    with pytest.raises(InvalidRequestError) as caught:
        producer.enqueue(request)

    [(field, message)] = caught.value.errors
    assert field == "webhook_url"
    assert message.startswith(reason)
    assert str(caught.value).startswith(f"webhook_url: {reason}")
    assert nothing_queued(producer)


def test_enqueue_many_names_the_request_whose_webhook_url_cannot_resolve(
    producer: Producer,
) -> None:
    requests = [
        {"input": {"prompt": "fine"}, "webhook_url": "https://hooks.example.com/cb"},
        {"input": {"prompt": "bad"}, "webhook_url": f"https://{'a' * 64}.example.com/cb"},
    ]

    with pytest.raises(InvalidRequestError) as caught:
        producer.enqueue_many(requests)

    assert [field for field, _ in caught.value.errors] == ["[1].webhook_url"]
    assert "is 64 characters; DNS allows at most 63" in caught.value.errors[0][1]
    assert nothing_queued(producer)


def test_a_webhook_url_at_the_limits_is_accepted(producer: Producer) -> None:
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    record = producer.enqueue({"input": {"prompt": "p"}, "webhook_url": f"https://{host}./cb"})
    assert record.request is not None
    assert record.request.webhook_url == f"https://{host}./cb"
    assert producer.rt.redis.llen(QUEUE_SUBMIT) == 1
