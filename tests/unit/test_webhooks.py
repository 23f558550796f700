"""Webhook signing (checked with the reference ``standardwebhooks`` package), status
classification, the retry schedule, and one delivery attempt against a real local server."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.devtools.embedded import free_port
from worker.services.url_guard import UrlGuard, guarded_client
from worker.services.webhooks import (
    USER_AGENT,
    DeliveryResult,
    WebhookSender,
    classify_status,
    next_retry_delay,
    sign,
    webhook_headers,
)
from worker.settings import DEFAULT_WEBHOOK_RETRY_SCHEDULE

SECRET_A = "whsec_" + base64.b64encode(b"secret-a-0123456789abcdef0123456").decode()
SECRET_B = "whsec_" + base64.b64encode(b"secret-b-0123456789abcdef0123456").decode()
SECRET_C = "whsec_" + base64.b64encode(b"secret-c-0123456789abcdef0123456").decode()
BODY = json.dumps(
    {"type": "job.succeeded", "data": {"id": "job_1", "note": "café ×"}}, ensure_ascii=False
).encode()

# --------------------------------------------------------------------------------------------
# signing


def test_known_vector_from_the_specification() -> None:
    # The example in the Standard Webhooks / Svix documentation.
    signature = sign(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_matches_reference_sign() -> None:
    ts = 1_700_000_000
    expected = Webhook(SECRET_A).sign("msg_1", datetime.fromtimestamp(ts, UTC), BODY.decode())
    assert sign([SECRET_A], "msg_1", ts, BODY) == expected


def test_reference_verifies_single_secret() -> None:
    now = int(time.time())
    headers = webhook_headers([SECRET_A], "msg_abc", now, BODY)
    assert Webhook(SECRET_A).verify(BODY, headers) == json.loads(BODY)


def test_rotation_every_secret_signs_and_each_alone_verifies() -> None:
    now = int(time.time())
    headers = webhook_headers([SECRET_A, SECRET_B], "msg_rot", now, BODY)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    for secret in (SECRET_A, SECRET_B):
        Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_C).verify(BODY, headers)


@pytest.mark.parametrize(
    "change",
    [
        {"body": BODY.replace(b"job_1", b"job_2")},
        {"msg_id": "msg_other"},
        {"timestamp": 1},
    ],
)
def test_reference_rejects_tampering(change: dict[str, Any]) -> None:
    now = int(time.time())
    headers = webhook_headers([SECRET_A], "msg_t", now, BODY)
    body = change.get("body", BODY)
    if "msg_id" in change:
        headers["webhook-id"] = change["msg_id"]
    if "timestamp" in change:
        headers["webhook-timestamp"] = str(now + change["timestamp"])
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body, headers)


def test_reference_rejects_stale_timestamp() -> None:
    old = int(time.time()) - 600  # the reference tolerates 5 minutes
    headers = webhook_headers([SECRET_A], "msg_old", old, BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET_A).verify(BODY, headers)


def test_unpadded_secret_signs_like_the_reference() -> None:
    unpadded = "whsec_" + base64.b64encode(b"sixteen-bytes!!x").decode().rstrip("=")
    headers = webhook_headers([unpadded], "msg_u", int(time.time()), BODY)
    Webhook(unpadded).verify(BODY, headers)


def test_headers() -> None:
    headers = webhook_headers([SECRET_A], "msg_h", 1_700_000_000, BODY)
    assert headers == {
        "webhook-id": "msg_h",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign([SECRET_A], "msg_h", 1_700_000_000, BODY),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    assert SECRET_A not in json.dumps(headers)


def test_sign_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="no webhook secret"):
        sign([], "msg", 1, b"{}")
    with pytest.raises(ValueError, match="empty"):
        sign(["whsec_"], "msg", 1, b"{}")


# --------------------------------------------------------------------------------------------
# pure decisions


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "delivered"),
        (201, "delivered"),
        (202, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (301, "permanent"),
        (302, "permanent"),
        (307, "permanent"),
        (308, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (403, "permanent"),
        (404, "permanent"),
        (405, "permanent"),
        (413, "permanent"),
        (422, "permanent"),
        (408, "retry"),
        (429, "retry"),
        (410, "gone"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (599, "retry"),
        (100, "retry"),
        (600, "retry"),
    ],
)
def test_classify_status(status: int, outcome: str) -> None:
    assert classify_status(status) == outcome


@pytest.mark.parametrize(
    ("schedule", "attempt", "delay"),
    [
        ((5.0, 300.0, 1800.0), 1, 5.0),
        ((5.0, 300.0, 1800.0), 2, 300.0),
        ((5.0, 300.0, 1800.0), 3, 1800.0),
        ((5.0, 300.0, 1800.0), 4, None),
        ((5.0, 300.0, 1800.0), 100, None),
        ((), 1, None),
        ((0.0,), 1, 0.0),
        ([1, 2], 2, 2.0),
        (DEFAULT_WEBHOOK_RETRY_SCHEDULE, 1, 5.0),
        (DEFAULT_WEBHOOK_RETRY_SCHEDULE, 7, 36000.0),
        (DEFAULT_WEBHOOK_RETRY_SCHEDULE, 8, None),
    ],
)
def test_next_retry_delay(schedule: tuple[float, ...], attempt: int, delay: float | None) -> None:
    assert next_retry_delay(schedule, attempt) == delay


def test_next_retry_delay_counts_from_one() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        next_retry_delay((5.0,), 0)


# --------------------------------------------------------------------------------------------
# deliver() against a real server


@dataclass
class Received:
    """A request as the test server saw it."""

    path: str
    headers: dict[str, str]
    body: bytes


class HookServer(ThreadingHTTPServer):
    daemon_threads = True
    received: list[Received]
    release: threading.Event


class HookHandler(BaseHTTPRequestHandler):
    """``/status/<code>`` answers that code; ``/slow`` stalls; ``/redirect`` sends a 302;
    ``/leak`` answers 400 with the test secret in its body."""

    server: HookServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append(
            Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        if self.path == "/slow":
            self.server.release.wait(10)  # the client gives up long before
            self._answer(200)
        elif self.path == "/redirect":
            self._answer(302, location="/status/200")
        elif self.path == "/leak":
            self._answer(400, body=f"bad signature, expected secret {SECRET_A}".encode())
        else:
            code = int(self.path.rsplit("/", 1)[-1])
            self._answer(code, body=b"nope" if code >= 400 else b"")

    def _answer(self, code: int, body: bytes = b"", location: str | None = None) -> None:
        self.send_response(code)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hook_server() -> Iterator[HookServer]:
    """A webhook target on 127.0.0.1."""
    server = HookServer(("127.0.0.1", 0), HookHandler)
    server.received, server.release = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def base(hook_server: HookServer) -> str:
    """The hook server's base URL."""
    return f"http://127.0.0.1:{hook_server.server_address[1]}"


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    """A sender on a guarded client that allows 127.0.0.1, with a short timeout."""
    client = guarded_client(UrlGuard(allow_private=True), timeout=httpx.Timeout(0.3))
    yield WebhookSender([SecretStr(SECRET_A), SecretStr(SECRET_B)], client)
    client.close()


def test_deliver_2xx(sender: WebhookSender, base: str, hook_server: HookServer) -> None:
    now = int(time.time())
    result = sender.deliver(f"{base}/status/204", "msg_ok", BODY, timestamp=now)
    assert result.outcome == "delivered"
    assert result.status_code == 204
    assert result.error is None
    assert result.duration_ms >= 0
    [seen] = hook_server.received
    assert seen.body == BODY  # byte for byte: not re-serialised
    assert seen.headers["webhook-id"] == "msg_ok"
    assert seen.headers["webhook-timestamp"] == str(now)
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"] == USER_AGENT
    assert Webhook(SECRET_B).verify(seen.body, seen.headers) == json.loads(BODY)


def test_same_id_on_every_attempt(
    sender: WebhookSender, base: str, hook_server: HookServer
) -> None:
    now = int(time.time())
    sender.deliver(f"{base}/status/503", "msg_same", BODY, timestamp=now)
    sender.deliver(f"{base}/status/200", "msg_same", BODY, timestamp=now + 5)
    assert [r.headers["webhook-id"] for r in hook_server.received] == ["msg_same", "msg_same"]
    for seen in hook_server.received:
        Webhook(SECRET_A).verify(seen.body, seen.headers)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (200, "delivered"),
        (202, "delivered"),
        (410, "gone"),
        (400, "permanent"),
        (404, "permanent"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_deliver_status(sender: WebhookSender, base: str, code: int, outcome: str) -> None:
    result = sender.deliver(f"{base}/status/{code}", "msg_s", BODY, timestamp=int(time.time()))
    assert result.outcome == outcome
    assert result.status_code == code
    if outcome == "delivered":
        assert result.error is None
    else:
        assert result.error == f"HTTP {code}: nope"


def test_deliver_redirect_not_followed(
    sender: WebhookSender, base: str, hook_server: HookServer
) -> None:
    result = sender.deliver(f"{base}/redirect", "msg_r", BODY, timestamp=int(time.time()))
    assert result.outcome == "permanent"
    assert result.status_code == 302
    assert result.error is not None
    assert "not followed" in result.error
    assert [r.path for r in hook_server.received] == ["/redirect"]


def test_deliver_timeout(sender: WebhookSender, base: str) -> None:
    started = time.monotonic()
    result = sender.deliver(f"{base}/slow", "msg_t", BODY, timestamp=int(time.time()))
    assert time.monotonic() - started < 5
    assert result == DeliveryResult("retry", None, result.error, result.duration_ms)
    assert result.error is not None
    assert result.error.startswith("timeout")


def test_deliver_connection_refused(sender: WebhookSender) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    result = sender.deliver(url, "msg_c", BODY, timestamp=int(time.time()))
    assert result.outcome == "retry"
    assert result.status_code is None
    assert result.error is not None
    assert "ConnectError" in result.error


def test_deliver_forbidden_target(base: str, hook_server: HookServer) -> None:
    client = guarded_client(UrlGuard(allow_private=False), timeout=httpx.Timeout(1.0))
    with client:
        sender = WebhookSender([SecretStr(SECRET_A)], client)
        result = sender.deliver(f"{base}/status/200", "msg_f", BODY, timestamp=int(time.time()))
    assert result.outcome == "forbidden"
    assert result.status_code is None
    assert result.error is not None
    assert "loopback" in result.error
    assert hook_server.received == []


def test_deliver_unresolvable_host_retries() -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with guarded_client(
        UrlGuard(allow_private=False, resolver=no_dns), timeout=httpx.Timeout(1.0)
    ) as client:
        result = WebhookSender([SecretStr(SECRET_A)], client).deliver(
            "https://hooks.example.invalid/", "msg_d", BODY, timestamp=int(time.time())
        )
    assert result.outcome == "retry"
    assert result.error is not None
    assert "cannot resolve" in result.error


def test_error_text_never_contains_the_secret(sender: WebhookSender, base: str) -> None:
    result = sender.deliver(f"{base}/leak", "msg_l", BODY, timestamp=int(time.time()))
    assert result.outcome == "permanent"
    assert result.error is not None
    assert "[secret]" in result.error
    assert SECRET_A not in result.error
    assert SECRET_A.removeprefix("whsec_") not in result.error


def test_sender_needs_valid_secrets() -> None:
    with httpx.Client() as client:
        with pytest.raises(ValueError, match="at least one secret"):
            WebhookSender([], client)
        with pytest.raises(ValueError, match="empty"):
            WebhookSender([SecretStr("whsec_")], client)
