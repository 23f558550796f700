"""Webhooks to producers, per Standard Webhooks v1 (https://www.standardwebhooks.com).

Signing (:func:`sign`, :func:`webhook_headers`) is pure: the message id and timestamp are
passed in, so a retry reuses the same id and the signature is testable. Sending
(:class:`WebhookSender`) makes one attempt and classifies its outcome; when to try again
(:func:`next_retry_delay`) is a pure function of the schedule and the attempt count.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import httpx
from pydantic import SecretStr

from worker import __version__
from worker.errors import TargetForbiddenError

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the prefix, not a secret
USER_AGENT: Final = f"runcomfy-worker/{__version__} (Standard Webhooks)"
# Enough of a refusal body to tell the producer why; never the whole (possibly huge) body.
ERROR_BODY_MAX_BYTES: Final = 512
# A receiver that dribbles its error body must not hold the worker for long.
ERROR_BODY_BUDGET_S: Final = 2.0

Outcome = Literal["delivered", "gone", "permanent", "retry", "forbidden"]


def _secret_key(secret: str) -> bytes:
    # Padding is appended the way the reference library does, so unpadded secrets match too.
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` per secret, space-separated."""
    if not secrets:
        raise ValueError("no webhook secret to sign with")
    signed_content = f"{msg_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secrets:
        digest = hmac.new(_secret_key(secret), signed_content, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(signatures)


def webhook_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The headers of one delivery: id, timestamp, signature, content type, user agent."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def classify_status(status_code: int) -> Outcome:
    """What a receiver's HTTP status means for the webhook."""
    if 200 <= status_code < 300:
        return "delivered"
    if status_code == 410:
        return "gone"  # the receiver asks us to stop sending to this endpoint
    if status_code in (408, 429):
        return "retry"
    if 300 <= status_code < 500:
        return "permanent"  # 3xx included: redirects are never followed, each hop unvetted
    return "retry"


@dataclass(frozen=True)
class DeliveryResult:
    """How one delivery attempt went."""

    outcome: Outcome
    status_code: int | None
    error: str | None
    duration_ms: int


def next_retry_delay(schedule: Sequence[float], attempt: int) -> float | None:
    """Seconds to wait before the next attempt after ``attempt`` attempts, None when done."""
    if attempt < 1:
        raise ValueError("attempt counts attempts already made, so it starts at 1")
    if attempt > len(schedule):
        return None
    return float(schedule[attempt - 1])


class WebhookSender:
    """Signs and POSTs webhook bodies, one attempt per call; never raises for network trouble."""

    def __init__(self, secrets: Sequence[SecretStr], client: httpx.Client) -> None:
        if not secrets:
            raise ValueError("WebhookSender needs at least one secret (WEBHOOK_SECRET)")
        self._secrets = tuple(s.get_secret_value() for s in secrets)
        for secret in self._secrets:
            _secret_key(secret)  # fail at start-up, not on the first delivery
        self._client = client

    def _scrub(self, text: str) -> str:
        # Error text ends up in job records and logs; a secret must never reach them.
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
            text = text.replace(secret.removeprefix(SECRET_PREFIX), "[secret]")
        return text

    def deliver(self, url: str, msg_id: str, body: bytes, *, timestamp: int) -> DeliveryResult:
        """POST ``body`` (already-serialised JSON) to ``url`` once, signed with ``timestamp``."""
        headers = webhook_headers(self._secrets, msg_id, timestamp, body)
        started = time.monotonic()

        def result(outcome: Outcome, status: int | None, error: str | None) -> DeliveryResult:
            elapsed_ms = round((time.monotonic() - started) * 1000)
            text = self._scrub(error) if error is not None else None
            return DeliveryResult(outcome, status, text, elapsed_ms)

        try:
            with self._client.stream(
                "POST", url, content=body, headers=headers, follow_redirects=False
            ) as response:
                status = response.status_code
                outcome = classify_status(status)
                if outcome == "delivered":
                    return result(outcome, status, None)
                return result(outcome, status, _describe_refusal(response))
        except TargetForbiddenError as exc:
            return result("forbidden", None, str(exc))
        except httpx.TimeoutException as exc:
            return result("retry", None, f"timeout ({type(exc).__name__}): {exc}")
        except httpx.InvalidURL as exc:
            return result("permanent", None, f"invalid URL: {exc}")
        except httpx.UnsupportedProtocol as exc:
            return result("permanent", None, f"unsupported URL: {exc}")
        except httpx.HTTPError as exc:
            return result("retry", None, f"{type(exc).__name__}: {exc}")


def _describe_refusal(response: httpx.Response) -> str:
    """``HTTP 503: <start of the body>``, reading at most a little of the body."""
    text = f"HTTP {response.status_code}"
    if location := response.headers.get("location"):
        text += f" (redirect to {location[:200]}, not followed)"
    snippet = b""
    deadline = time.monotonic() + ERROR_BODY_BUDGET_S
    try:
        for chunk in response.iter_bytes():
            snippet += chunk
            if len(snippet) >= ERROR_BODY_MAX_BYTES or time.monotonic() > deadline:
                break
    except httpx.HTTPError:
        pass  # the status already says what happened; a broken body adds nothing
    detail = snippet[:ERROR_BODY_MAX_BYTES].decode("utf-8", "replace").strip()
    return f"{text}: {detail}" if detail else text
