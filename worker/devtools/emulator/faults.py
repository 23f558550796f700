"""Fault injection for the emulator: scripted rules and seeded random rates, both reproducible.

Two families of fault kinds:

* per call (``429``, ``500``, ``502``, ``503``, ``slow``, ``malformed_json``, ``reset``,
  ``requeued``, ``error_code_200``): change the answer to one HTTP call on an endpoint
  (``submit``, ``status``, ``result``, ``cancel``, ``download``; ``any`` matches all five).
  ``output_404`` on the ``download`` endpoint also acts per call. ``error_code_200`` answers
  HTTP 200 with a top-level ``{"error_code": N, "error_message": "..."}`` body instead of the
  documented shape (as some RunComfy APIs do), without doing the call's work; the code and
  message come from the rule (default 400002 and its usual message).
* per request (``cancel``, ``fail``, ``output_404``): decided once, when a request is
  submitted; the request is later cancelled by "upstream", fails, or has output URLs that 404.

Rules are consulted first, in order; the first whose endpoint (and request id, if set) matches
and that has uses left applies. Otherwise one number is drawn from ``random.Random(seed)`` and
walked through the matching rates, so the same sequence of calls meets the same faults.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultKind = Literal[
    "429",
    "500",
    "502",
    "503",
    "slow",
    "malformed_json",
    "reset",
    "requeued",
    "cancel",
    "output_404",
    "fail",
    "error_code_200",
]
RequestFault = Literal["cancel", "fail", "output_404"]
Endpoint = Literal["submit", "status", "result", "cancel", "download", "any"]
CallEndpoint = Literal["submit", "status", "result", "cancel", "download"]

FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))
ENDPOINTS: Final[frozenset[str]] = frozenset(get_args(Endpoint))
#: Kinds that change the answer to a single call.
#: ``requeued``: a status answer says ``in_queue`` whatever the request's state (upstream
#: re-queued a started request). ``error_code_200``: HTTP 200 with an error-code body.
CALL_KINDS: Final = frozenset(
    {"429", "500", "502", "503", "slow", "malformed_json", "reset", "requeued", "error_code_200"}
)
#: RunComfy's documented error codes and the message the emulator gives each by default.
ERROR_CODE_MESSAGES: Final[dict[int, str]] = {
    400001: "Invalid resource identifier",
    400002: "Insufficient resources: account balance is too low",
    400004: "User account error",
    403001: "Permission denied",
    404001: "request does not exist, was deleted or has expired",
}
DEFAULT_ERROR_CODE: Final = 400002
#: Kinds decided at submit time that change what happens to the request.
REQUEST_KINDS: Final = frozenset({"cancel", "fail", "output_404"})


def _is_call_level(kind: str, scope: str) -> bool:
    """Whether a rule or rate of ``kind`` scoped to ``scope`` acts per call (else per request)."""
    return kind in CALL_KINDS or (kind == "output_404" and scope == "download")


class FaultRule(BaseModel):
    """Apply ``kind`` to the next ``times`` calls on ``endpoint`` (``times=None``: every call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    endpoint: Endpoint = "any"
    times: int | None = Field(default=1, ge=1)
    retry_after_s: float | None = Field(
        default=None, ge=0, description="Retry-After of a 429; default: the config's."
    )
    delay_s: float | None = Field(
        default=None, ge=0, description="How long a slow answer waits; default: the config's."
    )
    request_id: str | None = Field(
        default=None, description="Only calls about this request (status/result/cancel/download)."
    )
    error_code: int | None = Field(
        default=None, description="error_code of an error_code_200 answer; default 400002."
    )
    error_message: str | None = Field(
        default=None, description="error_message of an error_code_200 answer; default: the code's."
    )

    @model_validator(mode="after")
    def _endpoint_fits_kind(self) -> FaultRule:
        if self.kind != "error_code_200" and (
            self.error_code is not None or self.error_message is not None
        ):
            raise ValueError("error_code and error_message only go with kind 'error_code_200'")
        if self.kind in ("cancel", "fail") and self.endpoint not in ("submit", "any"):
            raise ValueError(f"kind {self.kind!r} is decided at submit: endpoint submit or any")
        if self.kind == "output_404" and self.endpoint not in ("submit", "any", "download"):
            raise ValueError("kind 'output_404' needs endpoint submit, any or download")
        if self.kind == "requeued" and self.endpoint != "status":
            raise ValueError("kind 'requeued' needs endpoint status")
        return self


def parse_rate_key(key: str) -> tuple[str, str]:
    """Split a rate key ``KIND`` or ``KIND@ENDPOINT`` into (kind, endpoint)."""
    kind, _, endpoint = key.partition("@")
    endpoint = endpoint or "any"
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(sorted(FAULT_KINDS))}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(sorted(ENDPOINTS))}")
    if kind in ("cancel", "fail") and endpoint not in ("submit", "any"):
        raise ValueError(f"kind {kind!r} is decided at submit: endpoint submit or any")
    if kind == "requeued" and endpoint != "status":
        raise ValueError("kind 'requeued' needs endpoint status")
    return kind, endpoint


def validate_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """Check keys and probabilities; the rates that can hit one call must add up to at most 1."""
    parsed = {key: parse_rate_key(key) for key in rates}
    for key, p in rates.items():
        if not 0 <= p <= 1:
            raise ValueError(f"rate {key!r} must be between 0 and 1, got {p}")
    for endpoint in ("submit", "status", "result", "cancel", "download"):
        call_total = sum(
            p
            for key, p in rates.items()
            if parsed[key][1] in ("any", endpoint) and _is_call_level(*parsed[key])
        )
        if call_total > 1 + 1e-9:
            raise ValueError(f"fault rates on {endpoint} add up to {call_total:.3f} > 1")
    request_total = sum(
        p
        for key, p in rates.items()
        if parsed[key][0] in REQUEST_KINDS and parsed[key][1] in ("submit", "any")
    )
    if request_total > 1 + 1e-9:
        raise ValueError(f"per-request fault rates add up to {request_total:.3f} > 1")
    return dict(rates)


@dataclass(frozen=True)
class Fault:
    """A fault chosen for one call: its kind and parameters (None: the config's default)."""

    kind: str
    retry_after_s: float | None = None
    delay_s: float | None = None
    error_code: int | None = None
    error_message: str | None = None


class FaultPlan:
    """The live fault state of one emulator: rules with uses left, rates, the seeded RNG."""

    def __init__(
        self, rules: Iterable[FaultRule], rates: Mapping[str, float], seed: int | None
    ) -> None:
        self._rules: list[tuple[FaultRule, list[int | None]]] = []
        self._call_rates: dict[str, list[tuple[str, float]]] = {}
        self._request_rates: list[tuple[str, float]] = []
        self._rates: dict[str, float] = {}
        self._seed = seed
        self._rng = random.Random(seed)
        self.set_rules(rules)
        self.set_rates(rates)

    def set_rules(self, rules: Iterable[FaultRule]) -> None:
        """Replace the rules; each starts with its full ``times``."""
        self._rules = [(rule, [rule.times]) for rule in rules]

    def set_rates(self, rates: Mapping[str, float]) -> None:
        """Replace the probabilistic rates (keys ``KIND`` or ``KIND@ENDPOINT``)."""
        self._rates = validate_rates(rates)
        # Sorted keys: the walk order, hence which fault a draw picks, must not depend on
        # the order a caller happened to build its dict in.
        ordered = sorted((parse_rate_key(k), p) for k, p in self._rates.items() if p > 0)
        self._call_rates = {
            endpoint: [
                (kind, p)
                for (kind, scope), p in ordered
                if scope in ("any", endpoint) and _is_call_level(kind, scope)
            ]
            for endpoint in ("submit", "status", "result", "cancel", "download")
        }
        self._request_rates = [
            (kind, p)
            for (kind, scope), p in ordered
            if kind in REQUEST_KINDS and scope in ("submit", "any")
        ]

    def reseed(self, seed: int | None) -> None:
        """Restart the random sequence."""
        self._seed = seed
        self._rng = random.Random(seed)

    def _take_rule(self, match: Any) -> FaultRule | None:
        for rule, left in self._rules:
            if left[0] == 0 or not match(rule):
                continue
            if left[0] is not None:
                left[0] -= 1
            return rule
        return None

    def _draw(self, table: list[tuple[str, float]]) -> str | None:
        if not table:
            return None
        point = self._rng.random()
        for kind, p in table:
            if point < p:
                return kind
            point -= p
        return None

    def for_call(self, endpoint: CallEndpoint, request_id: str | None = None) -> Fault | None:
        """The fault (if any) for one call on ``endpoint``; consumes a rule use or a draw."""

        def match(rule: FaultRule) -> bool:
            return (
                rule.endpoint in ("any", endpoint)
                and _is_call_level(rule.kind, rule.endpoint)
                and (rule.request_id is None or rule.request_id == request_id)
            )

        rule = self._take_rule(match)
        if rule is not None:
            return Fault(
                rule.kind, rule.retry_after_s, rule.delay_s, rule.error_code, rule.error_message
            )
        kind = self._draw(self._call_rates[endpoint])
        return Fault(kind) if kind is not None else None

    def for_new_request(self) -> RequestFault | None:
        """The per-request fault (``cancel``, ``fail``, ``output_404``) for a new submit."""

        def match(rule: FaultRule) -> bool:
            return rule.kind in REQUEST_KINDS and rule.endpoint in ("submit", "any")

        rule = self._take_rule(match)
        kind = rule.kind if rule is not None else self._draw(self._request_rates)
        return cast("RequestFault | None", kind)

    def snapshot(self) -> dict[str, Any]:
        """Rules with uses left, rates and seed, as JSON."""
        return {
            "rules": [
                {**rule.model_dump(mode="json"), "left": left[0]} for rule, left in self._rules
            ],
            "rates": dict(self._rates),
            "seed": self._seed,
        }
