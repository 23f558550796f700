"""The demo webhook receiver: verifies real signed deliveries from WebhookSender over HTTP."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from api_contracts.inputs import GenerationInput
from api_contracts.jobs import JobRecord, JobRequest, JobStatus, WebhookEvent
from worker.devtools.receiver import (
    ReceivedWebhook,
    WebhookReceiver,
    format_delivery,
    receiver_command,
)
from worker.services.url_guard import UrlGuard, guarded_client
from worker.services.webhooks import WebhookSender, webhook_headers

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"receiver-test-secret-0123456789ab").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-secret-0123456789abcd").decode()


def event_body(job_id: str = "job_abc") -> bytes:
    """A real WebhookEvent, serialised the way the service sends it."""
    now = datetime.now(UTC)
    record = JobRecord(
        id=job_id,
        status=JobStatus.SUCCEEDED,
        created_at=now,
        updated_at=now,
        request=JobRequest(
            input=GenerationInput.model_validate({"prompt": "a lighthouse at dusk"})
        ),
    )
    event = WebhookEvent(type="job.succeeded", timestamp=now, data=record)
    return event.model_dump_json().encode()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A receiver on a free port of 127.0.0.1."""
    with WebhookReceiver(SECRET) as running:
        yield running


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    """A sender whose guard lets it reach 127.0.0.1."""
    client = guarded_client(UrlGuard(allow_private=True), timeout=httpx.Timeout(5.0))
    yield WebhookSender([SecretStr(SECRET)], client)
    client.close()


def test_url_points_at_the_bound_port(receiver: WebhookReceiver) -> None:
    assert receiver.url == f"http://127.0.0.1:{receiver.port}/hook"


def test_verified_delivery(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    body = event_body()
    now = int(time.time())
    result = sender.deliver(receiver.url, "msg_1", body, timestamp=now)
    assert (result.outcome, result.status_code) == ("delivered", 204)
    [delivery] = receiver.deliveries()
    assert delivery.webhook_id == "msg_1"
    assert delivery.timestamp == str(now)
    assert delivery.verified
    assert delivery.error is None
    assert delivery.status_sent == 204
    assert delivery.body == body
    assert delivery.path == "/hook"
    assert delivery.event == json.loads(body)
    assert delivery.event_type == "job.succeeded"
    assert delivery.job_id == "job_abc"
    assert receiver.events_by_id() == {"msg_1": json.loads(body)}


def test_any_path_is_accepted(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    url = receiver.url.replace("/hook", "/some/other/path")
    result = sender.deliver(url, "msg_p", event_body(), timestamp=int(time.time()))
    assert result.outcome == "delivered"
    assert receiver.deliveries()[0].path == "/some/other/path"


def test_rotated_secrets_verify(receiver: WebhookReceiver) -> None:
    with guarded_client(UrlGuard(allow_private=True), timeout=httpx.Timeout(5.0)) as client:
        rotating = WebhookSender([SecretStr(OTHER_SECRET), SecretStr(SECRET)], client)
        result = rotating.deliver(receiver.url, "msg_r", event_body(), timestamp=int(time.time()))
    assert result.outcome == "delivered"


def _post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers, timeout=5.0)


def test_tampered_body_rejected(receiver: WebhookReceiver) -> None:
    body = event_body()
    headers = webhook_headers([SECRET], "msg_t", int(time.time()), body)
    response = _post(receiver.url, body.replace(b"job_abc", b"job_xyz"), headers)
    assert response.status_code == 400
    [delivery] = receiver.deliveries()
    assert not delivery.verified
    assert delivery.event is None
    assert delivery.status_sent == 400
    assert delivery.error is not None
    assert "signature" in delivery.error.lower()
    assert receiver.events_by_id() == {}


@pytest.mark.parametrize(
    ("secret", "age_s", "drop", "error"),
    [
        (OTHER_SECRET, 0, None, "signature"),
        (SECRET, 600, None, "too old"),
        (SECRET, -600, None, "too new"),
        (SECRET, 0, "webhook-signature", "missing"),
        (SECRET, 0, "webhook-id", "missing"),
    ],
)
def test_bad_deliveries_rejected(
    receiver: WebhookReceiver, secret: str, age_s: int, drop: str | None, error: str
) -> None:
    body = event_body()
    headers = webhook_headers([secret], "msg_b", int(time.time()) - age_s, body)
    if drop:
        del headers[drop]
    assert _post(receiver.url, body, headers).status_code == 400
    [delivery] = receiver.deliveries()
    assert not delivery.verified
    assert delivery.error is not None
    assert error in delivery.error.lower()


def test_malformed_signature_header_is_a_400_not_a_crash(receiver: WebhookReceiver) -> None:
    body = event_body()
    headers = webhook_headers([SECRET], "msg_m", int(time.time()), body)
    headers["webhook-signature"] = "garbage-without-comma"
    assert _post(receiver.url, body, headers).status_code == 400
    assert receiver.deliveries()[0].error is not None


def test_set_status_simulates_an_outage(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    receiver.set_status(503)
    down = sender.deliver(receiver.url, "msg_o", event_body(), timestamp=int(time.time()))
    assert (down.outcome, down.status_code) == ("retry", 503)
    receiver.set_status(410)
    gone = sender.deliver(receiver.url, "msg_o", event_body(), timestamp=int(time.time()))
    assert gone.outcome == "gone"
    receiver.set_status(None)
    back = sender.deliver(receiver.url, "msg_o", event_body(), timestamp=int(time.time()))
    assert back.outcome == "delivered"
    statuses = [(d.status_sent, d.verified) for d in receiver.deliveries()]
    assert statuses == [(503, True), (410, True), (204, True)]


def test_fail_next(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    receiver.fail_next(2, 500)
    outcomes = [
        sender.deliver(receiver.url, "msg_n", event_body(), timestamp=int(time.time())).outcome
        for _ in range(3)
    ]
    assert outcomes == ["retry", "retry", "delivered"]
    assert [d.status_sent for d in receiver.deliveries()] == [500, 500, 204]
    # one logical event, three deliveries with the same id
    assert list(receiver.events_by_id()) == ["msg_n"]


def test_wait_for_and_callback(sender: WebhookSender) -> None:
    seen: list[str] = []
    with WebhookReceiver(SECRET, on_delivery=lambda d: seen.append(format_delivery(d))) as rec:
        sender.deliver(rec.url, "msg_w", event_body("job_w"), timestamp=int(time.time()))
        deliveries = rec.wait_for(lambda ds: len(ds) >= 1, timeout=5)
        assert deliveries[0].webhook_id == "msg_w"
        with pytest.raises(TimeoutError):
            rec.wait_for(lambda ds: len(ds) >= 2, timeout=0.05)
        summary = httpx.get(rec.url, timeout=5).json()
    assert summary == [
        {
            "webhook_id": "msg_w",
            "type": "job.succeeded",
            "job_id": "job_w",
            "verified": True,
            "status_sent": 204,
            "error": None,
        }
    ]
    assert seen == ["msg_w job.succeeded job=job_w verified=yes answered=204"]


def test_format_delivery_unverified() -> None:
    delivery = ReceivedWebhook(
        webhook_id="msg_x",
        timestamp="1",
        verified=False,
        body=b"{}",
        event=None,
        status_sent=400,
        error="No matching signature found",
        received_at=0.0,
    )
    assert format_delivery(delivery) == (
        "msg_x - job=- verified=no answered=400 error=No matching signature found"
    )


def test_cli_needs_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    result = CliRunner().invoke(receiver_command, ["--port", "0"])
    assert result.exit_code == 2
    assert "no secret" in result.output


def test_cli_rejects_unusable_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_")
    result = CliRunner().invoke(receiver_command, ["--port", "0"])
    assert result.exit_code == 2
    assert "unusable secret" in result.output


def test_cli_help() -> None:
    result = CliRunner().invoke(receiver_command, ["--help"])
    assert result.exit_code == 0
    assert "--port" in result.output
    assert "9000" in result.output


def test_a_sender_that_goes_away_mid_request_prints_no_traceback(
    receiver: WebhookReceiver, capfd: pytest.CaptureFixture[str]
) -> None:
    # Half a body, then a reset (SO_LINGER 0): the receiver's read fails with
    # ConnectionResetError, as when a worker is SIGKILLed while delivering.
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
        sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.1)  # the handler is waiting for the rest of the body
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.3)  # the handler thread meets the reset
    assert "Traceback" not in capfd.readouterr().err
    # Still serving.
    assert httpx.get(f"http://127.0.0.1:{receiver.port}/").status_code == 200
    assert receiver.deliveries() == []
