"""Account protection in the emulator core, on a fake clock: concurrency and rate limits per
token, error-code bodies with HTTP 200, a balance that runs out, request ids that expire."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from worker.devtools.emulator import Emulator, EmulatorConfig, FaultRule, Reply, token_key
from worker.devtools.emulator import cli as emulator_cli
from worker.services.runcomfy import parse_retry_after

MODEL = "/v1/models/bytedance/dreamina-4-0/text-to-image"
LOW_BALANCE = {
    "error_code": 400002,
    "error_message": "Insufficient resources: account balance is too low",
}
NO_429S = {"concurrency": 0, "rate": 0, "fault": 0}


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**config: Any) -> tuple[Emulator, Clock]:
    clock = Clock()
    settings = {"token": None, "queue_s": 1.0, "run_s": 10.0, "capacity": 2, **config}
    return Emulator(EmulatorConfig(**settings), "http://emu", clock=clock), clock


def raw(emu: Emulator, method: str, path: str, body: Any = None, token: str = "t") -> Reply:
    data = json.dumps(body).encode() if body is not None else b""
    return emu.handle(method, path, f"Bearer {token}", data)


def call(
    emu: Emulator, method: str, path: str, body: Any = None, token: str = "t"
) -> tuple[int, Any]:
    reply = raw(emu, method, path, body, token)
    assert isinstance(reply.body, bytes)
    return reply.status, json.loads(reply.body)


def post_submit(emu: Emulator, token: str = "t") -> Reply:
    return raw(emu, "POST", MODEL, {"prompt": "a cat"}, token)


def submit(emu: Emulator, token: str = "t") -> str:
    status, answer = call(emu, "POST", MODEL, {"prompt": "a cat"}, token)
    assert status == 200, answer
    return str(answer["request_id"])


def body_of(reply: Reply) -> Any:
    assert isinstance(reply.body, bytes)
    return json.loads(reply.body)


# --- concurrency limit ------------------------------------------------------------------


def test_concurrency_limit_per_token_answers_429_with_retry_after() -> None:
    emu, clock = make(max_concurrent=2, retry_after_s=2.5)
    first, _ = submit(emu), submit(emu)
    refused = post_submit(emu)
    assert refused.status == 429
    assert refused.headers == {"Retry-After": "2.5"}
    assert body_of(refused) == {
        "error": {
            "code": "rate_limited",
            "message": "too many requests in progress: 2 of 2 allowed (emulated)",
            "reason": "concurrency",
            "retry_after_s": 2.5,
        }
    }
    other = submit(emu, token="u")  # another token has its own limit
    counters = emu.counters()
    assert counters["submits"] == 4
    assert counters["requests"]["in_queue"] == 3  # the refused submit created nothing
    assert counters["too_many_requests"] == {"concurrency": 1, "rate": 0, "fault": 0}
    assert counters["responses"] == {"200": 3, "429": 1}
    # A client cancel frees a slot at once.
    assert call(emu, "POST", f"/v1/requests/{first}/cancel")[0] == 200
    submit(emu)
    assert post_submit(emu).status == 429
    # Finished requests free their slots too.
    clock.now += 1.0 + 10.0 + 10.0
    submit(emu)
    submit(emu)
    assert post_submit(emu).status == 429
    counters = emu.counters()
    assert counters["too_many_requests"]["concurrency"] == 3
    assert counters["max_in_upstream_by_token"] == {token_key("t"): 2, token_key("u"): 1}
    assert counters["max_in_upstream"] == 3
    assert other in {r["request_id"] for r in emu.requests_snapshot()}


def test_max_in_upstream_is_tracked_without_limits() -> None:
    emu, clock = make()
    for _ in range(5):
        submit(emu)
    submit(emu, token="u")
    clock.now += 1.0 + 10.0  # two finished, two running, two queued
    submit(emu)
    counters = emu.counters()
    assert counters["max_in_upstream"] == 6
    assert counters["max_in_upstream_by_token"] == {token_key("t"): 5, token_key("u"): 1}
    assert counters["too_many_requests"] == NO_429S
    clock.now += 100.0
    submit(emu)
    assert emu.counters()["max_in_upstream"] == 6
    emu.reset()
    assert emu.counters()["max_in_upstream"] == 0
    assert emu.counters()["max_in_upstream_by_token"] == {}


def test_token_key_is_a_fingerprint_not_the_token() -> None:
    key = token_key("secret-token")
    assert key.startswith("sha256:")
    assert len(key) == len("sha256:") + 12
    assert "secret" not in key
    assert key != token_key("other")


def test_concurrency_limit_can_be_set_at_runtime() -> None:
    emu, _ = make()
    for _ in range(3):
        submit(emu)
    emu.update_config(max_concurrent=3)
    assert post_submit(emu).status == 429
    emu.update_config(max_concurrent=None)
    submit(emu)
    with pytest.raises(ValidationError):
        emu.update_config(max_concurrent=0)


# --- submit rate limit --------------------------------------------------------------------


def test_rate_limit_token_bucket_with_fractional_retry_after() -> None:
    emu, clock = make(max_submits_per_s=2.0)  # bucket of 2, refilled at 2/s
    submit(emu)
    submit(emu)
    refused = post_submit(emu)
    assert refused.status == 429
    assert refused.headers == {"Retry-After": "0.5"}
    assert parse_retry_after(refused.headers["Retry-After"]) == 0.5
    assert body_of(refused) == {
        "error": {
            "code": "rate_limited",
            "message": "too many submits: at most 2 per second (emulated)",
            "reason": "rate",
            "retry_after_s": 0.5,
        }
    }
    clock.now += 0.2
    assert post_submit(emu).headers["Retry-After"] == "0.3"
    clock.now += 0.3
    submit(emu)
    assert post_submit(emu).status == 429
    submit(emu, token="u")  # per token
    submit(emu, token="u")
    clock.now += 10.0  # the bucket holds at most 2
    submit(emu)
    submit(emu)
    assert post_submit(emu).status == 429
    counters = emu.counters()
    assert counters["too_many_requests"] == {"concurrency": 0, "rate": 4, "fault": 0}
    assert sum(counters["requests"].values()) == 7  # refused submits created nothing
    assert counters["submits"] == 11


def test_rate_limit_burst_and_slow_rates() -> None:
    emu, clock = make(max_submits_per_s=0.4, submit_burst=1)
    submit(emu)
    refused = post_submit(emu)
    assert refused.headers["Retry-After"] == "2.5"
    clock.now += 2.5
    submit(emu)
    emu.update_config(max_submits_per_s=3.0)
    clock.now += 1.0
    submit(emu)
    assert post_submit(emu).headers["Retry-After"] == "0.334"  # 1/3 s rounded up to the ms
    emu.update_config(submit_burst=5)
    clock.now += 5.0
    for _ in range(5):
        submit(emu)
    assert post_submit(emu).status == 429


def test_only_accepted_submits_use_the_rate_bucket() -> None:
    emu, _ = make(max_submits_per_s=1.0)
    for _ in range(3):
        assert call(emu, "POST", MODEL, {"prompt": ""})[0] == 422
    submit(emu)
    assert post_submit(emu).status == 429
    assert emu.counters()["too_many_requests"]["rate"] == 1


def test_429_faults_are_counted_by_reason() -> None:
    emu, _ = make(faults=[FaultRule(kind="429", endpoint="any", times=2)])
    assert post_submit(emu).status == 429
    assert call(emu, "GET", "/v1/requests/x/status")[0] == 429
    assert emu.counters()["too_many_requests"] == {"concurrency": 0, "rate": 0, "fault": 2}


def test_concurrency_is_checked_before_rate() -> None:
    emu, _ = make(max_concurrent=1, max_submits_per_s=1.0)
    submit(emu)
    refused = post_submit(emu)
    assert body_of(refused)["error"]["reason"] == "concurrency"
    assert emu.counters()["too_many_requests"] == {"concurrency": 1, "rate": 0, "fault": 0}


# --- error-code bodies with HTTP 200 -----------------------------------------------------


def test_error_code_200_fault_on_submit_creates_nothing() -> None:
    emu, _ = make(
        faults=[
            FaultRule(
                kind="error_code_200", endpoint="submit", error_code=403001, error_message="nope"
            )
        ]
    )
    reply = post_submit(emu)
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert body_of(reply) == {"error_code": 403001, "error_message": "nope"}
    counters = emu.counters()
    assert counters["requests"]["in_queue"] == 0
    assert counters["faults"] == {"error_code_200": 1}
    assert counters["responses"] == {"200": 1}
    submit(emu)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (None, "Insufficient resources: account balance is too low"),
        (400001, "Invalid resource identifier"),
        (400004, "User account error"),
        (403001, "Permission denied"),
        (404001, "request does not exist, was deleted or has expired"),
        (499999, "error 499999 (emulated)"),
    ],
)
def test_error_code_200_default_messages(code: int | None, message: str) -> None:
    emu, _ = make()
    rid = submit(emu)
    emu.set_faults([FaultRule(kind="error_code_200", endpoint="status", error_code=code)])
    assert call(emu, "GET", f"/v1/requests/{rid}/status") == (
        200,
        {"error_code": code or 400002, "error_message": message},
    )
    assert call(emu, "GET", f"/v1/requests/{rid}/status")[1]["status"] == "in_queue"


def test_error_code_200_by_rate_and_on_downloads_and_cancel() -> None:
    emu, clock = make(queue_s=0.0, run_s=0.0, fault_rates={"error_code_200@result": 1.0})
    rid = submit(emu)
    assert call(emu, "GET", f"/v1/requests/{rid}/result") == (200, LOW_BALANCE)
    emu.set_faults([], rates={})
    clock.now += 1.0
    emu.set_faults([FaultRule(kind="error_code_200", endpoint="download")])
    reply = raw(emu, "GET", f"/files/{rid}/0.png")
    assert (reply.status, reply.content_type, body_of(reply)) == (
        200,
        "application/json",
        LOW_BALANCE,
    )
    assert raw(emu, "GET", f"/files/{rid}/0.png").content_type == "image/png"
    queued = submit(emu)
    emu.set_faults([FaultRule(kind="error_code_200", endpoint="cancel")])
    assert call(emu, "POST", f"/v1/requests/{queued}/cancel") == (200, LOW_BALANCE)
    assert call(emu, "GET", f"/v1/requests/{queued}/status")[1]["status"] != "cancelled"
    assert emu.counters()["faults"] == {"error_code_200": 3}


def test_error_code_fields_only_with_their_kind() -> None:
    with pytest.raises(ValidationError, match="only go with kind"):
        FaultRule(kind="500", error_code=400002)
    with pytest.raises(ValidationError, match="only go with kind"):
        FaultRule(kind="429", error_message="x")


# --- balance ------------------------------------------------------------------------------


def test_balance_runs_out_then_is_topped_up() -> None:
    emu, _ = make(balance=2.0)
    assert emu.counters()["balance"] == 2.0
    submit(emu)
    submit(emu)
    refused = post_submit(emu)
    assert refused.status == 400
    assert body_of(refused) == LOW_BALANCE
    counters = emu.counters()
    assert counters["balance"] == 0.0
    assert counters["charged"] == 2.0
    assert counters["insufficient_balance"] == 1
    assert counters["requests"]["in_queue"] == 2
    assert emu.top_up(1.5) == 1.5
    submit(emu)
    assert emu.balance == 0.5
    assert post_submit(emu).status == 400
    assert emu.set_balance(None) is None
    for _ in range(3):
        submit(emu)
    counters = emu.counters()
    assert counters["balance"] is None
    assert counters["charged"] == 3.0
    assert counters["insufficient_balance"] == 2
    with pytest.raises(ValueError, match="unlimited"):
        emu.top_up(1)


def test_account_errors_as_200_and_cost() -> None:
    emu, _ = make(balance=1.0, cost_per_request=0.5, account_errors_as_200=True)
    submit(emu)
    submit(emu)
    refused = post_submit(emu)
    assert (refused.status, body_of(refused)) == (200, LOW_BALANCE)
    emu.update_config(account_errors_as_200=False, cost_per_request=0.0)
    submit(emu)  # free
    emu.update_config(balance=-1.0)  # sets the live balance
    assert post_submit(emu).status == 400
    emu.reset()
    assert emu.balance == 1.0
    assert emu.counters()["charged"] == 0.0


def test_refused_submits_are_not_charged() -> None:
    emu, _ = make(balance=10.0, max_concurrent=1)
    submit(emu)
    assert post_submit(emu).status == 429
    assert call(emu, "POST", MODEL, {"prompt": ""})[0] == 422
    emu.set_faults([FaultRule(kind="503", endpoint="submit")])
    assert post_submit(emu).status == 503
    assert emu.balance == 9.0
    # The balance is checked after the limits: a 429 says nothing about money.
    emu.set_balance(0)
    assert post_submit(emu).status == 429
    assert emu.counters()["insufficient_balance"] == 0


def test_admin_balance_endpoint() -> None:
    emu, _ = make(balance=1.0, cost_per_request=2.0)
    assert call(emu, "GET", "/_emulator/balance") == (
        200,
        {"balance": 1.0, "charged": 0.0, "cost_per_request": 2.0},
    )
    assert call(emu, "POST", "/_emulator/balance", {"add": 3}) == (
        200,
        {"balance": 4.0, "charged": 0.0, "cost_per_request": 2.0},
    )
    submit(emu)
    assert call(emu, "POST", "/_emulator/balance", {"set": 0.5})[1]["balance"] == 0.5
    assert call(emu, "GET", "/_emulator/counters")[1]["charged"] == 2.0
    assert call(emu, "POST", "/_emulator/balance", {"set": None})[1]["balance"] is None
    for bad in ({}, {"add": 1, "set": 1}, {"add": "x"}, {"add": True}, {"add": None}, [1]):
        status, answer = call(emu, "POST", "/_emulator/balance", bad)
        assert status == 422, bad
        assert answer["error"]["code"] == "validation_error"
    status, answer = call(emu, "POST", "/_emulator/balance", {"add": 1})
    assert (status, answer["error"]["message"]) == (
        422,
        "the balance is unlimited; set one first",
    )


def test_balance_config_validation() -> None:
    with pytest.raises(ValidationError):
        EmulatorConfig(cost_per_request=-1)
    with pytest.raises(ValidationError):
        EmulatorConfig(balance=float("inf"))
    with pytest.raises(ValidationError):
        EmulatorConfig(max_submits_per_s=0)
    with pytest.raises(ValidationError):
        EmulatorConfig(submit_burst=0.5)
    with pytest.raises(ValidationError):
        EmulatorConfig(request_ttl_s=0)
    with pytest.raises(ValueError, match="finite"):
        make()[0].set_balance(float("nan"))


# --- request ids that expire -------------------------------------------------------------


def expired_body(rid: str) -> dict[str, Any]:
    return {"error_code": 404001, "error_message": f"request {rid} does not exist or has expired"}


def test_request_expires_ttl_after_it_ends() -> None:
    emu, clock = make(request_ttl_s=5.0, capacity=1)
    rid = submit(emu)
    clock.now += 1.0 + 10.0  # completed at +11
    assert call(emu, "GET", f"/v1/requests/{rid}/status")[1]["status"] == "completed"
    clock.now += 4.999
    assert call(emu, "GET", f"/v1/requests/{rid}/result")[0] == 200
    clock.now += 0.001
    for method, action in (("GET", "status"), ("GET", "result"), ("POST", "cancel")):
        assert call(emu, method, f"/v1/requests/{rid}/{action}") == (404, expired_body(rid))
    assert raw(emu, "GET", f"/files/{rid}/0.png").status == 200  # the CDN copy stays
    counters = emu.counters()
    assert counters["expired"] == 3
    assert counters["requests"]["completed"] == 1
    # Unknown ids keep their own answer.
    assert call(emu, "GET", "/v1/requests/nope/status")[1]["error"]["code"] == "request_not_found"


def test_requests_in_upstream_never_expire() -> None:
    emu, clock = make(request_ttl_s=1.0, capacity=1, queue_s=0.0, run_s=100.0)
    running, queued = submit(emu), submit(emu)
    clock.now += 50.0
    assert call(emu, "GET", f"/v1/requests/{running}/status")[1]["status"] == "in_progress"
    assert call(emu, "GET", f"/v1/requests/{queued}/status")[1]["status"] == "in_queue"
    assert call(emu, "POST", f"/v1/requests/{queued}/cancel")[0] == 200
    clock.now += 0.5
    assert call(emu, "GET", f"/v1/requests/{queued}/status")[1]["status"] == "cancelled"
    clock.now += 0.5  # one second after the cancel
    assert call(emu, "GET", f"/v1/requests/{queued}/status") == (404, expired_body(queued))
    assert call(emu, "GET", f"/v1/requests/{running}/status")[0] == 200


def test_ttl_is_taken_at_submit() -> None:
    emu, clock = make(queue_s=0.0, run_s=0.0)
    forever = submit(emu)
    emu.update_config(request_ttl_s=2.0)
    short = submit(emu)
    emu.update_config(request_ttl_s=None)
    clock.now += 3.0
    assert call(emu, "GET", f"/v1/requests/{forever}/status")[0] == 200
    assert call(emu, "GET", f"/v1/requests/{short}/status") == (404, expired_body(short))


# --- CLI ------------------------------------------------------------------------------------


def test_cli_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[EmulatorConfig] = []
    monkeypatch.setattr(
        emulator_cli, "serve_forever", lambda config, host, port: seen.append(config)
    )
    args = [
        "--max-concurrent",
        "3",
        "--max-submits-per-s",
        "0.5",
        "--submit-burst",
        "2",
        "--balance",
        "10",
        "--cost-per-request",
        "2.5",
        "--account-errors-as-200",
        "--request-ttl-s",
        "60",
        "--retry-after-s",
        "4",
        "--fault-rate",
        "error_code_200@submit=0.1",
    ]
    result = CliRunner().invoke(emulator_cli.emulator_command, args)
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert config.max_concurrent == 3
    assert config.max_submits_per_s == 0.5
    assert config.submit_burst == 2
    assert config.balance == 10
    assert config.cost_per_request == 2.5
    assert config.account_errors_as_200 is True
    assert config.request_ttl_s == 60
    assert config.retry_after_s == 4
    assert config.fault_rates == {"error_code_200@submit": 0.1}


def test_cli_defaults_leave_protection_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[EmulatorConfig] = []
    monkeypatch.setattr(
        emulator_cli, "serve_forever", lambda config, host, port: seen.append(config)
    )
    assert CliRunner().invoke(emulator_cli.emulator_command, []).exit_code == 0
    config = seen[0]
    assert (config.max_concurrent, config.max_submits_per_s, config.submit_burst) == (
        None,
        None,
        None,
    )
    assert (config.balance, config.cost_per_request, config.account_errors_as_200) == (
        None,
        1.0,
        False,
    )
    assert config.request_ttl_s is None
    assert config.retry_after_s == 1.0
    bad = CliRunner().invoke(emulator_cli.emulator_command, ["--max-submits-per-s", "0"])
    assert bad.exit_code == 2
