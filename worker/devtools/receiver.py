"""A webhook receiver for trying the service out: the demo, docker-compose and tests.

It accepts POSTs on any path, verifies each with the reference ``standardwebhooks`` package
(which refuses timestamps more than 5 minutes from its clock), records every delivery and
answers 204 when verified, 400 when not. Tests can make it misbehave with
:meth:`WebhookReceiver.set_status` (always answer e.g. 503) or
:meth:`WebhookReceiver.fail_next` (answer e.g. 500 to the next n deliveries).

``standardwebhooks`` comes with the ``receiver`` extra (``pip install
'runcomfy-worker[receiver]'``), not with the service; it is imported when a receiver is built.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final, Self

import click

from worker.devtools.embedded import ManagedService

MAX_BODY_BYTES: Final = 10 * 1024 * 1024

DeliveryCallback = Callable[["ReceivedWebhook"], None]


@dataclass
class ReceivedWebhook:
    """One delivery as the receiver saw it."""

    webhook_id: str
    timestamp: str
    verified: bool
    body: bytes
    event: dict[str, Any] | None
    status_sent: int
    error: str | None
    received_at: float
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def event_type(self) -> str | None:
        """The event's ``type`` (``job.succeeded`` …), if the body was a verified event."""
        value = (self.event or {}).get("type")
        return value if isinstance(value, str) else None

    @property
    def job_id(self) -> str | None:
        """The job id in the event's ``data``, if any."""
        data = (self.event or {}).get("data")
        value = data.get("id") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None


def _load_verifier(secret: str) -> Any:
    try:
        from standardwebhooks.webhooks import Webhook
    except ImportError as exc:  # pragma: no cover - the receiver extra is missing
        raise RuntimeError(
            "the webhook receiver needs the 'standardwebhooks' package: "
            "pip install 'runcomfy-worker[receiver]'"
        ) from exc
    return Webhook(secret)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that went away mid-request (a worker killed while it waited for the
        answer) is routine: only other errors print socketserver's traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "runcomfy-webhook-receiver"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: deliveries are reported through the receiver, not stderr."""

    def do_POST(self) -> None:
        """Verify, record and answer one delivery."""
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413, b"body too large")
            return
        body = self.rfile.read(length) if length > 0 else b""
        status = self.server.receiver._record(self.path, dict(self.headers.items()), body)
        self._answer(status, b"" if status == 204 else f"{status}".encode())

    def do_GET(self) -> None:
        """A JSON summary of what arrived, for looking at the demo from a browser or curl."""
        summary = [
            {
                "webhook_id": d.webhook_id,
                "type": d.event_type,
                "job_id": d.job_id,
                "verified": d.verified,
                "status_sent": d.status_sent,
                "error": d.error,
            }
            for d in self.server.receiver.deliveries()
        ]
        self._answer(200, json.dumps(summary).encode(), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status not in (204, 304):
            self.wfile.write(body)


class WebhookReceiver(ManagedService):
    """An HTTP server on ``host:port`` that verifies and records Standard Webhooks deliveries."""

    def __init__(
        self,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        self._verifier = _load_verifier(secret)
        self._host = host
        self._port = port
        self._on_delivery = on_delivery
        self._deliveries: list[ReceivedWebhook] = []
        self._changed = threading.Condition()
        self._forced_status: int | None = None
        self._fail_count = 0
        self._fail_status = 503
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Where to send webhooks: ``http://<host>:<port>/hook``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/hook"

    def start(self) -> Self:
        """Bind and serve in a background thread."""
        server = _Server((self._host, self._port), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def set_status(self, code: int | None) -> None:
        """Answer every delivery with ``code`` (e.g. 503 = down); None restores normal answers."""
        with self._changed:
            self._forced_status = code

    def fail_next(self, n: int, code: int = 503) -> None:
        """Answer the next ``n`` deliveries with ``code``, then behave normally again."""
        with self._changed:
            self._fail_count = n
            self._fail_status = code

    def deliveries(self) -> list[ReceivedWebhook]:
        """Every delivery so far, in arrival order."""
        with self._changed:
            return list(self._deliveries)

    def events_by_id(self) -> dict[str, dict[str, Any]]:
        """The first verified event per ``webhook-id``: what an idempotent consumer would keep."""
        events: dict[str, dict[str, Any]] = {}
        for delivery in self.deliveries():
            if delivery.verified and delivery.event is not None:
                events.setdefault(delivery.webhook_id, delivery.event)
        return events

    def clear(self) -> None:
        """Forget recorded deliveries."""
        with self._changed:
            self._deliveries.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedWebhook]], bool], timeout: float = 10.0
    ) -> list[ReceivedWebhook]:
        """Block until ``predicate(deliveries)`` holds; TimeoutError after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(list(self._deliveries)), timeout):
                raise TimeoutError(
                    f"condition not met after {timeout}s; {len(self._deliveries)} deliveries"
                )
            return list(self._deliveries)

    def _verify(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[bool, dict[str, Any] | None, str | None]:
        try:
            self._verifier.verify(body, headers, json_parse=False)
        except Exception as exc:  # the reference raises ValueError etc. for malformed headers
            return False, None, f"{type(exc).__name__}: {exc}"
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            return True, None, f"signed body is not JSON: {exc}"
        if not isinstance(parsed, dict):
            return True, None, "signed body is not a JSON object"
        return True, parsed, None

    def _record(self, path: str, raw_headers: dict[str, str], body: bytes) -> int:
        headers = {k.lower(): v for k, v in raw_headers.items()}
        verified, event, error = self._verify(body, headers)
        with self._changed:
            if self._fail_count > 0:
                self._fail_count -= 1
                status = self._fail_status
            elif self._forced_status is not None:
                status = self._forced_status
            else:
                status = 204 if verified else 400
            delivery = ReceivedWebhook(
                webhook_id=headers.get("webhook-id", ""),
                timestamp=headers.get("webhook-timestamp", ""),
                verified=verified,
                body=body,
                event=event,
                status_sent=status,
                error=error,
                received_at=time.time(),
                path=path,
                headers=headers,
            )
            self._deliveries.append(delivery)
            self._changed.notify_all()
        if self._on_delivery is not None:
            self._on_delivery(delivery)
        return status


def format_delivery(delivery: ReceivedWebhook) -> str:
    """One line per delivery: id, type, job id, verified (and why not)."""
    line = (
        f"{delivery.webhook_id or '-'} {delivery.event_type or '-'} "
        f"job={delivery.job_id or '-'} verified={'yes' if delivery.verified else 'no'} "
        f"answered={delivery.status_sent}"
    )
    return f"{line} error={delivery.error}" if delivery.error else line


def _first_env_secret() -> str | None:
    entries = [s.strip() for s in os.environ.get("WEBHOOK_SECRET", "").split(",") if s.strip()]
    return entries[0] if entries else None


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    # As PID 1 in a container SIGTERM is ignored by default; make `docker stop` quick.
    def _exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("receiver")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=9000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--secret",
    default=None,
    help="whsec_… secret to verify with. [default: first entry of WEBHOOK_SECRET]",
)
def receiver_command(host: str, port: int, secret: str | None) -> None:
    """Run a webhook receiver that verifies and prints each delivery (for trying things out)."""
    secret = secret or _first_env_secret()
    if not secret:
        raise click.UsageError("no secret: pass --secret or set WEBHOOK_SECRET")
    try:
        receiver = WebhookReceiver(
            secret, host, port, on_delivery=lambda d: click.echo(format_delivery(d))
        )
    except Exception as exc:
        raise click.UsageError(f"unusable secret: {exc}") from None
    with _sigterm_exits(), receiver:
        click.echo(f"receiving webhooks at {receiver.url} (any path; Ctrl-C to stop)")
        with suppress(KeyboardInterrupt):
            threading.Event().wait()
