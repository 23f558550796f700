"""The emulator's behaviour without HTTP: one call in (method, path, token, body), one Reply out.

Thread-safe (one lock); time comes from an injectable clock so it can be tested without sleeping.
The HTTP layer (``server.py``) only parses requests and writes replies, including the delays,
truncations and connection resets a Reply asks for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

from pydantic import TypeAdapter, ValidationError

from api_contracts.inputs import GenerationInput
from worker.devtools.emulator.config import EmulatorConfig
from worker.devtools.emulator.faults import (
    DEFAULT_ERROR_CODE,
    ERROR_CODE_MESSAGES,
    CallEndpoint,
    Fault,
    FaultPlan,
    FaultRule,
)
from worker.devtools.emulator.lifecycle import EmulatedRequest, Scheduler, State
from worker.devtools.emulator.png import Blob, mp4_blob, png_blob

JSON_TYPE: Final = "application/json"
MAX_BODY_BYTES: Final = 1 << 20
_ERROR_STATUS: Final = {"429": 429, "500": 500, "502": 502, "503": 503}
_RULES: Final = TypeAdapter(list[FaultRule])
INSUFFICIENT_BALANCE: Final = 400002
REQUEST_EXPIRED: Final = 404001
INSUFFICIENT_BALANCE_MESSAGE: Final = "Insufficient resources: account balance is too low"
#: Reasons a 429 is answered, as counted in ``counters()["too_many_requests"]``.
TOO_MANY_REASONS: Final = ("concurrency", "rate", "fault")


@dataclass
class Reply:
    """What to send: status, headers, body, and any misbehaviour the HTTP layer must act out."""

    status: int
    body: bytes | Blob = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    reset_after: int | None = None
    """Abort the connection (TCP RST) after this many body bytes; None: answer normally."""
    body_limit: int | None = None
    """Send only this many bytes of a Blob body (a truncated, malformed file)."""


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    """A JSON answer."""
    return Reply(status, json.dumps(payload).encode(), headers=headers or {})


def error_reply(http_status: int, code: str, message: str, **extra: Any) -> Reply:
    """A JSON error: ``{"error": {"code", "message", ...}}``."""
    return json_reply(http_status, {"error": {"code": code, "message": message, **extra}})


def error_code_reply(http_status: int, code: int, message: str) -> Reply:
    """RunComfy's other error shape: a top-level ``{"error_code", "error_message"}`` body."""
    return json_reply(http_status, {"error_code": code, "error_message": message})


def token_key(token: str) -> str:
    """How counters name a Bearer token: a short fingerprint, never the token itself."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _format_seconds(seconds: float) -> str:
    # HTTP wants whole seconds; fractions are kept (not rounded up) so fast tests stay fast.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _wait_s(seconds: float) -> float:
    """A wait rounded up to the millisecond, at least 1 ms (never tells a client "now")."""
    return max(0.001, math.ceil(round(seconds * 1000, 6)) / 1000)


def _format_wait(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _validation_details(exc: ValidationError) -> list[dict[str, str]]:
    details = []
    for err in exc.errors():
        field_name = ".".join(str(part) for part in err["loc"]) or "body"
        details.append({"field": field_name, "message": err["msg"], "type": err["type"]})
    return details


@dataclass(frozen=True)
class _FileRef:
    """A download decided under the lock, built (possibly slowly, first time) outside it."""

    kind: str
    width: int
    height: int
    index: int
    min_bytes: int
    fault: Fault | None


class Emulator:
    """The RunComfy Model API's behaviour: requests, their lifecycle, outputs, faults, counters."""

    def __init__(
        self,
        config: EmulatorConfig,
        base_url: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial = config
        self._config = config
        self._served_base_url = base_url.rstrip("/")
        self._clock = clock
        self._lock = threading.Lock()
        self._scheduler = Scheduler()
        self._plan = FaultPlan(config.faults, config.fault_rates, config.seed)
        self._runtimes = random.Random(config.seed)
        self._calls: Counter[str] = Counter()
        self._by_request: dict[str, Counter[str]] = {
            "status": Counter(),
            "result": Counter(),
            "download": Counter(),
        }
        self._faults: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._clear_account_state()

    def _queue_time(self, config: EmulatorConfig) -> float:
        """How long a new request waits at least: queue_s, plus an exponential extra wait of
        mean queue_extra_s."""
        if config.queue_extra_s <= 0:
            return config.queue_s
        return config.queue_s + self._runtimes.expovariate(1.0 / config.queue_extra_s)

    def _run_time(self, config: EmulatorConfig) -> float:
        """How long a new request runs: run_s, spread lognormally by run_sigma."""
        if config.run_sigma <= 0:
            return config.run_s
        return config.run_s * math.exp(config.run_sigma * self._runtimes.gauss(0.0, 1.0))

    def _clear_account_state(self) -> None:
        """Limits, balance and their counters, as at start (caller holds the lock or is init)."""
        # Requests still in upstream, by token key (pruned lazily at each submit).
        self._active: dict[str, list[EmulatedRequest]] = {}
        self._max_in_upstream = 0
        self._max_in_upstream_by_token: dict[str, int] = {}
        # Token bucket per token key: (tokens, when last refilled).
        self._buckets: dict[str, tuple[float, float]] = {}
        self._too_many: Counter[str] = Counter(dict.fromkeys(TOO_MANY_REASONS, 0))
        self._balance = self._config.balance
        self._charged = 0.0
        self._insufficient = 0
        self._expired = 0

    # -- control -------------------------------------------------------------------------

    @property
    def config(self) -> EmulatorConfig:
        """The configuration in force."""
        return self._config

    @property
    def base_url(self) -> str:
        """Base of the URLs handed out in answers."""
        return self._config.public_base_url or self._served_base_url

    def counters(self) -> dict[str, Any]:
        """Calls per endpoint (and per request id), faults injected by kind, requests by state."""
        with self._lock:
            now = self._clock()
            self._scheduler.advance(now, self._config.capacity)
            return {
                "submits": self._calls["submit"],
                "status_calls": self._calls["status"],
                "result_calls": self._calls["result"],
                "cancels": self._calls["cancel"],
                "downloads": self._calls["download"],
                "unauthorized": self._calls["unauthorized"],
                "cancelled_by_client": self._calls["cancelled_by_client"],
                "status_calls_by_request": dict(self._by_request["status"]),
                "result_calls_by_request": dict(self._by_request["result"]),
                "downloads_by_request": dict(self._by_request["download"]),
                "faults": dict(self._faults),
                "faults_total": sum(self._faults.values()),
                "responses": dict(self._responses),
                "requests": self._scheduler.counts(now),
                "max_in_upstream": self._max_in_upstream,
                "max_in_upstream_by_token": dict(self._max_in_upstream_by_token),
                "too_many_requests": dict(self._too_many),
                "balance": self._balance,
                "charged": self._charged,
                "insufficient_balance": self._insufficient,
                "expired": self._expired,
            }

    def timelines(self) -> dict[str, tuple[float, float | None, float | None]]:
        """``request id -> (submitted, started, ended)`` on the emulator's clock (benchmarks
        hold detections against it; None: not started or not ended yet)."""
        with self._lock:
            now = self._clock()
            self._scheduler.advance(now, self._config.capacity)
            return {
                r.request_id: (r.submitted_at, r.started_at, r.ended_at)
                for r in self._scheduler.all()
            }

    def now(self) -> float:
        """The emulator's clock."""
        return self._clock()

    def reset(self) -> None:
        """Forget every request and counter; back to the configuration it started with."""
        with self._lock:
            self._config = self._initial
            self._scheduler = Scheduler()
            self._plan = FaultPlan(
                self._initial.faults, self._initial.fault_rates, self._initial.seed
            )
            self._runtimes = random.Random(self._initial.seed)
            self._calls.clear()
            for counter in self._by_request.values():
                counter.clear()
            self._faults.clear()
            self._responses.clear()
            self._clear_account_state()

    def seed(
        self,
        request_ids: Iterable[str],
        *,
        run_s: float | None = None,
        started_s_ago: float = 0.0,
        token: str | None = None,
    ) -> int:
        """Pre-register requests as if they had been submitted and started earlier, without
        a submit call each (benchmarks hold many jobs in flight this way); returns how many.

        Each is ``in_progress`` from ``started_s_ago`` seconds ago and runs ``run_s``
        (default: the configured run time, spread by ``run_sigma``): one 1024x1024 image of
        the first configured model, owned by ``token`` (default: the configured one). They
        skip the waiting line and ``capacity`` (they are running already, and hold their
        slots until they end) and count towards ``max_concurrent`` like submitted ones; no
        call is counted, nothing is charged, no fault is drawn. An id that is repeated or
        already known raises ValueError, and nothing is seeded."""
        ids = list(request_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("request ids to seed must be distinct")
        if run_s is not None and (not math.isfinite(run_s) or run_s < 0):
            raise ValueError(f"run_s must be a finite number >= 0, got {run_s!r}")
        if not math.isfinite(started_s_ago) or started_s_ago < 0:
            raise ValueError(f"started_s_ago must be a finite number >= 0, got {started_s_ago!r}")
        with self._lock:
            now = self._clock()
            self._scheduler.advance(now, self._config.capacity)
            known = [r for r in ids if self._scheduler.get(r) is not None]
            if known:
                raise ValueError(f"request ids already known: {known[:3]}")
            config = self._config
            key = token_key(token if token is not None else config.token or "")
            started = now - started_s_ago
            requests = [
                EmulatedRequest(
                    request_id=request_id,
                    model_id=config.model_ids[0],
                    width=1024,
                    height=1024,
                    force_single=True,
                    submitted_at=started,
                    queue_s=0.0,
                    run_s=self._run_time(config) if run_s is None else run_s,
                    images=1,
                    videos=1 if config.video else 0,
                    min_bytes=config.output_min_bytes,
                    token_key=key,
                    ttl_s=config.request_ttl_s,
                )
                for request_id in ids
            ]
            self._scheduler.add_running(requests, started)
            self._active.setdefault(key, []).extend(requests)
            mine = self._in_upstream(key, now)
            total = sum(self._in_upstream(k, now) for k in self._active)
            self._max_in_upstream_by_token[key] = max(
                self._max_in_upstream_by_token.get(key, 0), mine
            )
            self._max_in_upstream = max(self._max_in_upstream, total)
        return len(requests)

    @property
    def balance(self) -> float | None:
        """The account balance now (None: unlimited)."""
        with self._lock:
            return self._balance

    def set_balance(self, value: float | None) -> float | None:
        """Set the account balance (None: unlimited); returns it."""
        if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
            raise ValueError(f"balance must be a finite number or null, got {value!r}")
        with self._lock:
            self._balance = None if value is None else float(value)
            return self._balance

    def top_up(self, amount: float) -> float:
        """Add ``amount`` (may be negative) to a limited balance; returns the new balance."""
        if isinstance(amount, bool) or not math.isfinite(amount):
            raise ValueError(f"amount must be a finite number, got {amount!r}")
        with self._lock:
            if self._balance is None:
                raise ValueError("the balance is unlimited; set one first")
            self._balance += amount
            return self._balance

    def set_faults(
        self,
        rules: Iterable[FaultRule],
        rates: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        """Replace the fault rules; also the rates and the seed when given."""
        rules = list(rules)
        changes: dict[str, Any] = {"faults": rules}
        if rates is not None:
            changes["fault_rates"] = dict(rates)
        if seed is not None:
            changes["seed"] = seed
        self.update_config(**changes)

    def update_config(self, **changes: Any) -> EmulatorConfig:
        """Change any config field; timings apply to requests submitted from now on.

        ``balance`` also replaces the live balance; limits apply from the next submit.
        """
        with self._lock:
            new = self._config.updated(**changes)
            # Settle the past under the old capacity before the new one applies.
            self._scheduler.advance(self._clock(), self._config.capacity)
            if "faults" in changes:
                self._plan.set_rules(new.faults)
            if "fault_rates" in changes:
                self._plan.set_rates(new.fault_rates)
            if "seed" in changes:
                self._plan.reseed(new.seed)
                self._runtimes = random.Random(new.seed)
            if "balance" in changes:
                self._balance = new.balance
            self._config = new
            return new

    def faults_snapshot(self) -> dict[str, Any]:
        """Rules with their uses left, rates and seed."""
        with self._lock:
            return self._plan.snapshot()

    def requests_snapshot(self) -> list[dict[str, Any]]:
        """Every request with its state (debugging aid)."""
        with self._lock:
            now = self._clock()
            self._scheduler.advance(now, self._config.capacity)
            return [
                {
                    "request_id": r.request_id,
                    "model_id": r.model_id,
                    "size": f"{r.width}x{r.height}",
                    "status": r.state(now),
                    "fault": r.fault,
                    "prompt": r.prompt,
                    "token_key": r.token_key,
                }
                for r in self._scheduler.all()
            ]

    # -- one HTTP call ---------------------------------------------------------------------

    def handle(self, method: str, target: str, authorization: str | None, body: bytes) -> Reply:
        """Answer one HTTP call."""
        path = target.split("?", 1)[0]
        if path.startswith("/_emulator/"):
            return self._admin(method, path, body)
        with self._lock:
            outcome = self._route(method, path, authorization, body)
            status = 200 if isinstance(outcome, _FileRef) else outcome.status
            self._responses[str(status)] += 1
        if isinstance(outcome, _FileRef):
            return self._file_reply(outcome)
        return outcome

    def _route(
        self, method: str, path: str, authorization: str | None, body: bytes
    ) -> Reply | _FileRef:
        if path.startswith("/files/"):
            return self._download(method, path)
        parts = path.split("/")
        if path.startswith("/v1/models/"):
            model_id = unquote(path.removeprefix("/v1/models/")).strip("/")
            return self._api_call(
                "submit", ("POST",), method, authorization, body=body, model_id=model_id
            )
        if len(parts) == 5 and parts[:3] == ["", "v1", "requests"] and parts[3]:
            request_id = unquote(parts[3])
            if parts[4] in ("status", "result"):
                endpoint: CallEndpoint = "status" if parts[4] == "status" else "result"
                return self._api_call(
                    endpoint, ("GET",), method, authorization, request_id=request_id
                )
            if parts[4] == "cancel":
                return self._api_call(
                    "cancel", ("POST",), method, authorization, request_id=request_id
                )
        return error_reply(404, "not_found", f"no such endpoint: {method} {path}")

    def _api_call(
        self,
        endpoint: CallEndpoint,
        allowed: tuple[str, ...],
        method: str,
        authorization: str | None,
        *,
        request_id: str | None = None,
        body: bytes = b"",
        model_id: str = "",
    ) -> Reply:
        if method not in allowed:
            reply = error_reply(405, "method_not_allowed", f"use {' or '.join(allowed)}")
            reply.headers["Allow"] = ", ".join(allowed)
            return reply
        self._calls[endpoint] += 1
        if request_id is not None and endpoint in self._by_request:
            self._by_request[endpoint][request_id] += 1
        if not self._authorised(authorization):
            self._calls["unauthorized"] += 1
            reply = error_reply(401, "unauthorized", "missing or invalid Bearer token")
            reply.headers["WWW-Authenticate"] = 'Bearer realm="runcomfy"'
            return reply
        fault = self._plan.for_call(endpoint, request_id)
        if fault is not None:
            self._faults[fault.kind] += 1
            refusal = self._fault_refusal(fault)
            if refusal is not None:
                return refusal
        now = self._clock()
        self._scheduler.advance(now, self._config.capacity)
        if endpoint == "submit":
            reply = self._submit(model_id, body, now, _bearer_token(authorization))
        else:
            reply = self._about_request(endpoint, request_id or "", now)
        if fault is not None:
            # Slow, malformed and reset answers come after the work was done: upstream acted
            # on the call, only the answer is late, garbled or lost (the ambiguous case).
            self._act_out(reply, fault)
        return reply

    def _about_request(self, endpoint: CallEndpoint, request_id: str, now: float) -> Reply:
        """Answer status, result or cancel for one request id."""
        request = self._scheduler.get(request_id)
        if request is None:
            return error_reply(404, "request_not_found", f"no request {request_id!r}")
        if request.expired(now):
            self._expired += 1
            return error_code_reply(
                404, REQUEST_EXPIRED, f"request {request_id} does not exist or has expired"
            )
        if endpoint == "status":
            return json_reply(200, self._status_body(request, now))
        if endpoint == "result":
            return json_reply(200, self._result_body(request, now))
        return self._cancel(request, now)

    def _authorised(self, authorization: str | None) -> bool:
        token = _bearer_token(authorization)
        if not token:
            return False
        expected = self._config.token
        return expected is None or hmac.compare_digest(token.encode(), expected.encode())

    def _fault_refusal(self, fault: Fault) -> Reply | None:
        """The answer of a fault that refuses the call outright (no work done), else None."""
        if fault.kind in _ERROR_STATUS:
            return self._fault_error(fault)
        if fault.kind == "error_code_200":
            code = fault.error_code if fault.error_code is not None else DEFAULT_ERROR_CODE
            message = fault.error_message
            if message is None:
                message = ERROR_CODE_MESSAGES.get(code, f"error {code} (emulated)")
            return error_code_reply(200, code, message)
        return None

    def _fault_error(self, fault: Fault) -> Reply:
        if fault.kind == "429":
            self._too_many["fault"] += 1
            retry_after = (
                fault.retry_after_s
                if fault.retry_after_s is not None
                else self._config.retry_after_s
            )
            reply = error_reply(
                429, "rate_limited", "too many requests (emulated)", retry_after_s=retry_after
            )
            reply.headers["Retry-After"] = _format_seconds(retry_after)
            return reply
        status = _ERROR_STATUS[fault.kind]
        return error_reply(status, "upstream_error", f"emulated HTTP {status}")

    def _act_out(self, reply: Reply, fault: Fault) -> None:
        if fault.kind == "slow":
            reply.delay_s = fault.delay_s if fault.delay_s is not None else self._config.slow_s
        elif fault.kind == "malformed_json":
            assert isinstance(reply.body, bytes)
            reply.status = 200
            reply.body = reply.body[: max(1, len(reply.body) // 2)]
        elif fault.kind == "reset":
            reply.reset_after = 0
        elif fault.kind == "requeued" and reply.status == 200:
            data = json.loads(bytes(reply.body) if isinstance(reply.body, bytes) else b"{}")
            data.update({"status": "in_queue", "queue_position": 0})
            reply.body = json.dumps(data).encode()

    # -- endpoints ---------------------------------------------------------------------------

    def _urls(self, request_id: str) -> dict[str, str]:
        base = f"{self.base_url}/v1/requests/{request_id}"
        return {"status_url": f"{base}/status", "result_url": f"{base}/result"}

    def _too_many_reply(self, reason: str, retry_after: float, message: str) -> Reply:
        self._too_many[reason] += 1
        reply = error_reply(
            429,
            "rate_limited",
            message,
            reason=reason,
            retry_after_s=retry_after,
        )
        reply.headers["Retry-After"] = _format_wait(retry_after) if retry_after else "0"
        return reply

    def _in_upstream(self, key: str, now: float) -> int:
        """How many of this token's requests are in_queue/in_progress (prunes the rest)."""
        active = self._active.get(key)
        if not active:
            return 0
        active[:] = [r for r in active if r.in_upstream(now)]
        return len(active)

    def _limit_refusal(self, key: str, now: float) -> Reply | None:
        """A 429 if this token is over its concurrency or submit-rate limit, else None."""
        config = self._config
        if config.max_concurrent is not None:
            in_upstream = self._in_upstream(key, now)
            if in_upstream >= config.max_concurrent:
                return self._too_many_reply(
                    "concurrency",
                    config.retry_after_s,
                    f"too many requests in progress: {in_upstream} of "
                    f"{config.max_concurrent} allowed (emulated)",
                )
        rate = config.max_submits_per_s
        if rate is not None:
            tokens = self._bucket_tokens(key, now, rate)
            if tokens < 1 - 1e-9:
                return self._too_many_reply(
                    "rate",
                    _wait_s((1 - tokens) / rate),
                    f"too many submits: at most {rate:g} per second (emulated)",
                )
        return None

    def _bucket_size(self, rate: float) -> float:
        burst = self._config.submit_burst
        return burst if burst is not None else max(1.0, rate)

    def _bucket_tokens(self, key: str, now: float, rate: float) -> float:
        size = self._bucket_size(rate)
        tokens, since = self._buckets.get(key, (size, now))
        return min(size, tokens + max(0.0, now - since) * rate)

    def _account_refusal(self) -> Reply | None:
        """Error 400002 if the balance cannot pay for one more request, else None."""
        if self._balance is None or self._balance >= self._config.cost_per_request:
            return None
        self._insufficient += 1
        status = 200 if self._config.account_errors_as_200 else 400
        return error_code_reply(status, INSUFFICIENT_BALANCE, INSUFFICIENT_BALANCE_MESSAGE)

    def _accept(self, request: EmulatedRequest, now: float) -> None:
        """Charge for, rate-count and track a request that is being created."""
        config = self._config
        key = request.token_key
        if config.max_submits_per_s is not None:
            tokens = self._bucket_tokens(key, now, config.max_submits_per_s)
            self._buckets[key] = (tokens - 1, now)
        if self._balance is not None:
            self._balance -= config.cost_per_request
            self._charged += config.cost_per_request
        mine = self._in_upstream(key, now) + 1
        self._active.setdefault(key, []).append(request)
        total = sum(self._in_upstream(k, now) for k in self._active)
        self._max_in_upstream_by_token[key] = max(self._max_in_upstream_by_token.get(key, 0), mine)
        self._max_in_upstream = max(self._max_in_upstream, total)

    def _submit(self, model_id: str, body: bytes, now: float, token: str) -> Reply:
        if model_id not in self._config.model_ids:
            return error_reply(404, "model_not_found", f"no model {model_id!r}")
        if len(body) > MAX_BODY_BYTES:
            return error_reply(413, "body_too_large", f"body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return error_reply(400, "invalid_json", f"body is not JSON: {exc}")
        try:
            generation = GenerationInput.model_validate(data)
        except ValidationError as exc:
            details = _validation_details(exc)
            message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
            return error_reply(422, "validation_error", message, details=details)
        width, height = generation.dimensions
        key = token_key(token)
        refusal = self._limit_refusal(key, now) or self._account_refusal()
        if refusal is not None:
            return refusal
        fault = self._plan.for_new_request()
        if fault is not None:
            self._faults[fault] += 1
        config = self._config
        images = 1 if generation.force_single else config.images_per_set
        request = EmulatedRequest(
            request_id=str(uuid.uuid4()),
            model_id=model_id,
            width=width,
            height=height,
            force_single=generation.force_single,
            submitted_at=now,
            queue_s=self._queue_time(config),
            run_s=self._run_time(config),
            images=images,
            videos=images if config.video else 0,
            min_bytes=config.output_min_bytes,
            fault=fault,
            prompt=generation.prompt,
            token_key=key,
            ttl_s=config.request_ttl_s,
        )
        self._accept(request, now)
        self._scheduler.add(request)
        urls = self._urls(request.request_id)
        return json_reply(
            200,
            {
                "request_id": request.request_id,
                **urls,
                "cancel_url": f"{self.base_url}/v1/requests/{request.request_id}/cancel",
            },
        )

    def _status_body(self, request: EmulatedRequest, now: float) -> dict[str, Any]:
        state: State = request.state(now)
        body: dict[str, Any] = {"request_id": request.request_id, "status": state}
        if state == "in_queue":
            body["queue_position"] = self._scheduler.queue_position(request)
        body.update(self._urls(request.request_id))
        if state == "failed":
            body["error"] = {"code": "generation_failed", "message": "generation failed (emulated)"}
        return body

    def _result_body(self, request: EmulatedRequest, now: float) -> dict[str, Any]:
        if request.state(now) != "completed":
            return self._status_body(request, now)
        files = f"{self.base_url}/files/{request.request_id}"
        images = [f"{files}/{i}.png" for i in range(request.images)]
        videos = [f"{files}/{i}.mp4" for i in range(request.videos)]
        output: dict[str, Any] = {}
        if request.force_single:
            output["image"] = images[0]
            if videos:
                output["video"] = videos[0]
        else:
            output["images"] = images
            if videos:
                output["videos"] = videos
        return {"request_id": request.request_id, "status": "completed", "output": output}

    def _cancel(self, request: EmulatedRequest, now: float) -> Reply:
        state = request.state(now)
        if state == "in_queue":
            self._scheduler.cancel(request, now)
            self._calls["cancelled_by_client"] += 1
            state = "cancelled"
        if state == "cancelled":
            # Idempotent: a client retrying a cancel whose answer it lost gets the same answer.
            return json_reply(200, {"request_id": request.request_id, "status": "cancelled"})
        if state == "in_progress":
            message = (
                f"request {request.request_id} is in progress; "
                "only queued requests can be cancelled"
            )
        else:
            message = f"request {request.request_id} already finished ({state})"
        return error_reply(409, "not_cancellable", message, status=state)

    def _download(self, method: str, path: str) -> Reply | _FileRef:
        parts = path.split("/")
        name = parts[3] if len(parts) == 4 else ""
        stem, _, ext = name.partition(".")
        if not (parts[2] and stem.isdigit() and ext in ("png", "mp4")):
            return error_reply(404, "not_found", f"no such file: {path}")
        if method not in ("GET", "HEAD"):
            reply = error_reply(405, "method_not_allowed", "use GET or HEAD")
            reply.headers["Allow"] = "GET, HEAD"
            return reply
        request_id, index = unquote(parts[2]), int(stem)
        self._calls["download"] += 1
        self._by_request["download"][request_id] += 1
        fault = self._plan.for_call("download", request_id)
        if fault is not None:
            self._faults[fault.kind] += 1
            refusal = self._fault_refusal(fault)
            if refusal is not None:
                return refusal
            if fault.kind == "output_404":
                return error_reply(404, "not_found", f"no such file: {path} (emulated)")
        now = self._clock()
        self._scheduler.advance(now, self._config.capacity)
        request = self._scheduler.get(request_id)
        count = 0
        if request is not None and request.state(now) == "completed":
            count = request.images if ext == "png" else request.videos
        if request is None or index >= count or request.fault == "output_404":
            return error_reply(404, "not_found", f"no such file: {path}")
        return _FileRef(ext, request.width, request.height, index, request.min_bytes, fault)

    def _file_reply(self, ref: _FileRef) -> Reply:
        if ref.kind == "png":
            blob = png_blob(ref.width, ref.height, ref.index % 4, ref.min_bytes)
            reply = Reply(200, blob, content_type="image/png")
        else:
            reply = Reply(200, mp4_blob(ref.min_bytes, ref.index % 4), content_type="video/mp4")
        if ref.fault is not None:
            if ref.fault.kind == "slow":
                reply.delay_s = (
                    ref.fault.delay_s if ref.fault.delay_s is not None else self._config.slow_s
                )
            elif ref.fault.kind == "malformed_json":
                reply.body_limit = blob_size(reply) // 2
            elif ref.fault.kind == "reset":
                reply.reset_after = blob_size(reply) // 2
        return reply

    # -- admin -----------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> Reply:
        name = path.removeprefix("/_emulator/").strip("/")
        try:
            data: Any = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return error_reply(400, "invalid_json", f"body is not JSON: {exc}")
        handlers: dict[tuple[str, str], Callable[[], Reply]] = {
            ("GET", "health"): lambda: json_reply(200, {"ok": True}),
            ("GET", "counters"): lambda: json_reply(200, self.counters()),
            ("POST", "reset"): self._post_reset,
            ("GET", "faults"): lambda: json_reply(200, self.faults_snapshot()),
            ("POST", "faults"): lambda: self._post_faults(data),
            ("GET", "config"): lambda: json_reply(200, self._config.public_dump()),
            ("POST", "config"): lambda: self._post_config(data),
            ("GET", "requests"): lambda: json_reply(200, self.requests_snapshot()),
            ("GET", "balance"): lambda: json_reply(200, self._balance_body()),
            ("POST", "balance"): lambda: self._post_balance(data),
        }
        handler = handlers.get((method, name))
        try:
            if handler is not None:
                return handler()
        except ValidationError as exc:
            details = _validation_details(exc)
            message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
            return error_reply(422, "validation_error", message, details=details)
        except ValueError as exc:
            return error_reply(422, "validation_error", str(exc))
        return error_reply(404, "not_found", f"no such admin endpoint: {method} {path}")

    def _post_reset(self) -> Reply:
        self.reset()
        return json_reply(200, {"ok": True})

    def _post_faults(self, data: Any) -> Reply:
        if isinstance(data, list):
            data = {"rules": data}
        if not isinstance(data, dict) or set(data) - {"rules", "rates", "seed"}:
            return error_reply(
                422, "validation_error", 'expected {"rules": [...], "rates": {}, "seed": n}'
            )
        self.set_faults(
            _RULES.validate_python(data.get("rules", [])), data.get("rates"), data.get("seed")
        )
        return json_reply(200, self.faults_snapshot())

    def _balance_body(self) -> dict[str, Any]:
        with self._lock:
            return {
                "balance": self._balance,
                "charged": self._charged,
                "cost_per_request": self._config.cost_per_request,
            }

    def _post_balance(self, data: Any) -> Reply:
        if not isinstance(data, dict) or len(data) != 1 or set(data) - {"add", "set"}:
            return error_reply(422, "validation_error", 'expected {"add": N} or {"set": N or null}')
        value = data.get("add", data.get("set"))
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return error_reply(422, "validation_error", f"expected a number, got {value!r}")
        if "add" in data:
            if value is None:
                return error_reply(422, "validation_error", "add needs a number")
            self.top_up(value)
        else:
            self.set_balance(value)
        return json_reply(200, self._balance_body())

    def _post_config(self, data: Any) -> Reply:
        if not isinstance(data, dict):
            return error_reply(422, "validation_error", "expected a JSON object")
        return json_reply(200, self.update_config(**data).public_dump())


def blob_size(reply: Reply) -> int:
    """Length of a reply's full body."""
    return reply.body.size if isinstance(reply.body, Blob) else len(reply.body)
