"""A local, faithful stand-in for RunComfy's Model API (Dreamina 4.0 text-to-image).

Same paths, Bearer auth and answer shapes as upstream; a time-driven queue with bounded
capacity; real PNG outputs of the requested size served by the emulator itself; seeded,
reproducible fault injection; and private admin endpoints under ``/_emulator/``.

    from worker.devtools.emulator import EmulatorConfig, FaultRule, EmulatorServer

    with EmulatorServer(EmulatorConfig(token="t", queue_s=0.2, run_s=0.5)) as emu:
        emu.base_url   # "http://127.0.0.1:PORT"
        emu.counters()

Benchmarks that need many requests in flight register them without a submit each:
``emu.emulator.seed(request_ids, run_s=…)`` (the in-process :class:`Emulator`), already
``in_progress``.

Account protection, all off by default (``EmulatorConfig`` field / ``runcomfy-worker emulator``
flag). Limits are per Bearer token; counters name a token by ``token_key(token)``, a short
SHA-256 fingerprint, never the token itself.

* ``max_concurrent`` / ``--max-concurrent N``: a submit while the token already has N requests
  ``in_queue``/``in_progress`` answers HTTP 429, header ``Retry-After: <retry_after_s>``
  (``--retry-after-s``), body ``{"error": {"code": "rate_limited", "message", "reason":
  "concurrency", "retry_after_s"}}``; nothing is created or charged.
* ``max_submits_per_s`` / ``--max-submits-per-s R`` with ``submit_burst`` /
  ``--submit-burst N`` (default ``max(1, R)``): a token bucket per token, filled at R per
  second up to N; each accepted submit takes one. Empty: 429 as above with ``"reason":
  "rate"`` and ``Retry-After`` = seconds until one is allowed, rounded up to the millisecond
  (fractional: ``"0.5"``; the worker's ``parse_retry_after`` reads fractions). Only accepted
  submits use the bucket; refused ones (4xx, 429) do not.
* ``balance`` / ``--balance B`` with ``cost_per_request`` / ``--cost-per-request C``
  (default 1): each accepted submit costs C, charged at submit and never refunded; when the
  balance is below C a submit answers HTTP 400 ``{"error_code": 400002, "error_message":
  "Insufficient resources: account balance is too low"}`` (HTTP 200 with the same body if
  ``account_errors_as_200`` / ``--account-errors-as-200``). Top up with ``POST
  /_emulator/balance`` ``{"add": N}`` or ``{"set": N}`` (``null``: unlimited), or
  ``Emulator.top_up`` / ``set_balance``; ``GET /_emulator/balance`` reads it. Setting
  ``balance`` through ``update_config`` also sets the live balance (``GET /_emulator/config``
  shows the value last configured, the counters the live one); ``reset`` restores the
  starting one.
* ``request_ttl_s`` / ``--request-ttl-s T``: T seconds after a request reaches a final state
  (``completed``, ``failed``, ``cancelled``; never while queued or running), status, result
  and cancel for its id answer HTTP 404 ``{"error_code": 404001, "error_message": "request
  <id> does not exist or has expired"}``. Taken at submit, like the other timings. Output
  files stay downloadable. Unknown ids still answer 404 ``{"error": {"code":
  "request_not_found"}}``.
* fault kind ``error_code_200`` (rules: ``FaultRule(kind="error_code_200",
  endpoint="submit", error_code=400002, error_message="...")``; rates:
  ``--fault-rate error_code_200@status=0.1``): HTTP 200 with a top-level ``{"error_code",
  "error_message"}`` body instead of the documented shape, as some RunComfy APIs answer;
  the call's work is not done. Defaults: code 400002 and its usual message.

Limits are checked after the body is validated, in this order: concurrency, rate, balance.
Counters (``counters()``, ``GET /_emulator/counters``) add ``max_in_upstream`` (most
requests in_queue/in_progress at once, all tokens), ``max_in_upstream_by_token``,
``too_many_requests`` (429s answered by reason: ``concurrency``, ``rate``, ``fault``),
``balance`` (now; null: unlimited), ``charged`` (total), ``insufficient_balance`` (submits
refused with 400002) and ``expired`` (calls answered 404001).
"""

from worker.devtools.emulator.config import EmulatorConfig
from worker.devtools.emulator.core import Emulator, Reply, token_key
from worker.devtools.emulator.faults import CALL_KINDS, FAULT_KINDS, REQUEST_KINDS, FaultRule
from worker.devtools.emulator.server import EmulatorServer, serve_forever

__all__ = [
    "CALL_KINDS",
    "FAULT_KINDS",
    "REQUEST_KINDS",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultRule",
    "Reply",
    "serve_forever",
    "token_key",
]
