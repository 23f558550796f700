#!/usr/bin/env python3
"""A minimal receiver for runcomfy-worker webhooks: verify, de-duplicate, act, answer 2xx.

Every delivery is a POST with a JSON ``WebhookEvent`` body (``type`` is ``job.succeeded``,
``job.failed`` or ``job.cancelled``; ``data`` is the ``JobRecord``) and the Standard Webhooks
headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``. This receiver:

* verifies the signature with the reference ``standardwebhooks`` package (which also refuses
  timestamps more than 5 minutes off) and answers 400 when it does not verify;
* treats ``webhook-id`` as the idempotency key: a retry carries the same id, so a repeat is
  acknowledged without being processed twice;
* answers 204 quickly. Any other answer (or none within WEBHOOK_TIMEOUT_S) makes the worker
  retry on WEBHOOK_RETRY_SCHEDULE; answer 410 Gone to make it stop for good.

    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 9000

Standard library plus ``pip install standardwebhooks``; no web framework.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 10 * 1024 * 1024

EventHandler = Callable[[str, dict[str, Any]], None]


def print_event(webhook_id: str, event: dict[str, Any]) -> None:
    """Default action: one line per event, with the archived objects."""
    job = event["data"]
    line = f"{event['type']} job={job['id']} webhook-id={webhook_id} verified"
    for output in job.get("outputs", []):
        line += f"\n  {output['s3_uri']} {output['bytes']} bytes sha256={output['sha256']}"
    if job.get("error"):
        line += f"\n  error {job['error']['code']}: {job['error']['message']}"
    print(line, flush=True)


class ReceiverServer(ThreadingHTTPServer):
    """HTTP server holding the verifier and the ids already processed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], secret: str, on_event: EventHandler) -> None:
        super().__init__(address, _Handler)
        self.webhook = Webhook(secret)
        self.on_event = on_event
        self.seen: set[str] = set()  # use a database table with a unique key in production
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: ReceiverServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: print_event reports what matters

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413)
            return
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            event = self.server.webhook.verify(body, headers)
        except WebhookVerificationError as exc:
            print(f"rejected a delivery: {exc}", file=sys.stderr, flush=True)
            self._answer(400)
            return
        webhook_id = headers["webhook-id"]
        with self.server.lock:
            duplicate = webhook_id in self.server.seen
            self.server.seen.add(webhook_id)
        if not duplicate:
            try:
                self.server.on_event(webhook_id, event)
            except Exception as exc:  # let the worker retry later
                with self.server.lock:
                    self.server.seen.discard(webhook_id)
                print(f"handler failed, asking for a retry: {exc}", file=sys.stderr, flush=True)
                self._answer(503)
                return
        self._answer(204)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def make_server(
    secret: str, host: str = "127.0.0.1", port: int = 9000, on_event: EventHandler = print_event
) -> ReceiverServer:
    """A receiver bound to host:port (0: any free port); call serve_forever() on it."""
    return ReceiverServer((host, port), secret, on_event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify and print runcomfy-worker webhooks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--secret",
        default=os.environ.get("WEBHOOK_SECRET", "").split(",")[0].strip(),
        help="whsec_... (default: first entry of $WEBHOOK_SECRET)",
    )
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("no secret: pass --secret or set WEBHOOK_SECRET")
    server = make_server(args.secret, args.host, args.port)
    print(f"listening on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
