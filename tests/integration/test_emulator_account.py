"""Account protection over real HTTP: per-token concurrency and rate limits (429 +
Retry-After), error-code bodies with HTTP 200, a balance that runs out and is topped up, and
request ids that expire. The server runs on a clock the tests move, so nothing sleeps."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from worker.devtools.embedded import free_port, wait_for_port
from worker.devtools.emulator import EmulatorConfig, EmulatorServer, FaultRule, token_key
from worker.services.runcomfy import parse_retry_after

pytestmark = pytest.mark.integration

TOKEN = "acct-token"
OTHER = "other-token"
SUBMIT = "/v1/models/bytedance/dreamina-4-0/text-to-image"
CONFIG = EmulatorConfig(token=None, queue_s=1.0, run_s=10.0, capacity=2, seed=5)
LOW_BALANCE = {
    "error_code": 400002,
    "error_message": "Insufficient resources: account balance is too low",
}


class Clock:
    """A clock tests move by hand (read by the server's thread)."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def server(clock: Clock) -> Iterator[EmulatorServer]:
    with EmulatorServer(CONFIG, port=0, clock=clock) as emu:
        yield emu


@pytest.fixture
def emu(server: EmulatorServer) -> EmulatorServer:
    server.reset()
    return server


def client(emu: EmulatorServer, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=emu.base_url, headers=headers, timeout=5.0)


@pytest.fixture
def http(emu: EmulatorServer) -> Iterator[httpx.Client]:
    with client(emu, TOKEN) as c:
        yield c


@pytest.fixture
def other(emu: EmulatorServer) -> Iterator[httpx.Client]:
    with client(emu, OTHER) as c:
        yield c


@pytest.fixture
def admin(emu: EmulatorServer) -> Iterator[httpx.Client]:
    with client(emu, None) as c:
        yield c


def submit(http: httpx.Client) -> str:
    answer = http.post(SUBMIT, json={"prompt": "a fox"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["request_id"])


def counters(admin: httpx.Client) -> dict[str, Any]:
    answer = admin.get("/_emulator/counters")
    assert answer.status_code == 200
    return dict(answer.json())


def test_concurrency_limit_over_http(
    emu: EmulatorServer,
    clock: Clock,
    http: httpx.Client,
    other: httpx.Client,
    admin: httpx.Client,
) -> None:
    config = admin.post("/_emulator/config", json={"max_concurrent": 2, "retry_after_s": 3})
    assert config.status_code == 200
    assert config.json()["max_concurrent"] == 2
    submit(http)
    submit(http)
    refused = http.post(SUBMIT, json={"prompt": "a fox"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {
        "error": {
            "code": "rate_limited",
            "message": "too many requests in progress: 2 of 2 allowed (emulated)",
            "reason": "concurrency",
            "retry_after_s": 3.0,
        }
    }
    submit(other)
    clock.now += 1.0 + 10.0  # the first two complete
    submit(http)
    seen = counters(admin)
    assert seen["max_in_upstream"] == 3
    assert seen["max_in_upstream_by_token"] == {token_key(TOKEN): 2, token_key(OTHER): 1}
    assert seen["too_many_requests"] == {"concurrency": 1, "rate": 0, "fault": 0}
    assert seen["responses"]["429"] == 1
    assert seen["requests"] == {
        "in_queue": 1,  # the new one waits its queue_s
        "in_progress": 1,  # the other token's, started when a slot freed
        "completed": 2,
        "cancelled": 0,
        "failed": 0,
    }
    assert TOKEN not in admin.get("/_emulator/counters").text


def test_rate_limit_over_http(
    emu: EmulatorServer, clock: Clock, http: httpx.Client, other: httpx.Client, admin: httpx.Client
) -> None:
    emu.update_config(max_submits_per_s=4.0, submit_burst=1)
    submit(http)
    refused = http.post(SUBMIT, json={"prompt": "a fox"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "0.25"
    assert parse_retry_after(refused.headers["retry-after"]) == 0.25
    assert refused.json()["error"]["reason"] == "rate"
    assert refused.json()["error"]["retry_after_s"] == 0.25
    submit(other)  # its own bucket
    clock.now += 0.25
    submit(http)
    assert http.post(SUBMIT, json={"prompt": "a fox"}).status_code == 429
    emu.set_faults([FaultRule(kind="429", endpoint="submit", retry_after_s=7)])
    faulted = other.post(SUBMIT, json={"prompt": "a fox"})
    assert (faulted.status_code, faulted.headers["retry-after"]) == (429, "7")
    assert counters(admin)["too_many_requests"] == {"concurrency": 0, "rate": 2, "fault": 1}


def test_error_code_with_200_over_http(
    emu: EmulatorServer, http: httpx.Client, admin: httpx.Client
) -> None:
    rid = submit(http)
    rules = admin.post(
        "/_emulator/faults",
        json=[
            {"kind": "error_code_200", "endpoint": "submit", "error_code": 400004},
            {
                "kind": "error_code_200",
                "endpoint": "status",
                "error_code": 403001,
                "error_message": "token revoked",
            },
        ],
    )
    assert rules.status_code == 200
    assert rules.json()["rules"][1]["error_message"] == "token revoked"
    refused = http.post(SUBMIT, json={"prompt": "a fox"})
    assert refused.status_code == 200
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error_code": 400004, "error_message": "User account error"}
    status = http.get(f"/v1/requests/{rid}/status")
    assert (status.status_code, status.json()) == (
        200,
        {"error_code": 403001, "error_message": "token revoked"},
    )
    assert http.get(f"/v1/requests/{rid}/status").json()["status"] == "in_queue"
    seen = counters(admin)
    assert seen["faults"] == {"error_code_200": 2}
    assert seen["requests"]["in_queue"] == 1
    bad = admin.post("/_emulator/faults", json=[{"kind": "503", "error_code": 1}])
    assert bad.status_code == 422


def test_balance_over_http(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    assert admin.post("/_emulator/config", json={"balance": 2, "cost_per_request": 1}).is_success
    assert admin.get("/_emulator/balance").json() == {
        "balance": 2.0,
        "charged": 0.0,
        "cost_per_request": 1.0,
    }
    submit(http)
    submit(http)
    refused = http.post(SUBMIT, json={"prompt": "a fox"})
    assert refused.status_code == 400
    assert refused.json() == LOW_BALANCE
    emu.update_config(account_errors_as_200=True)
    refused = http.post(SUBMIT, json={"prompt": "a fox"})
    assert (refused.status_code, refused.json()) == (200, LOW_BALANCE)
    topped = admin.post("/_emulator/balance", json={"add": 1})
    assert topped.status_code == 200
    assert topped.json() == {"balance": 1.0, "charged": 2.0, "cost_per_request": 1.0}
    submit(http)
    assert emu.balance == 0.0
    assert emu.top_up(2) == 2.0
    assert emu.set_balance(1) == 1.0
    submit(http)
    seen = counters(admin)
    assert (seen["balance"], seen["charged"], seen["insufficient_balance"]) == (0.0, 4.0, 2)
    assert admin.post("/_emulator/balance", json={"set": None}).json()["balance"] is None
    submit(http)
    assert admin.post("/_emulator/balance", json={"add": "lots"}).status_code == 422
    assert admin.post("/_emulator/reset").is_success
    assert admin.get("/_emulator/balance").json()["balance"] is None  # as configured at start


def test_request_ids_expire_over_http(
    emu: EmulatorServer, clock: Clock, http: httpx.Client, admin: httpx.Client
) -> None:
    emu.update_config(request_ttl_s=30.0, queue_s=0.0, run_s=1.0)
    rid = submit(http)
    clock.now += 1.0
    result = http.get(f"/v1/requests/{rid}/result")
    assert result.json()["status"] == "completed"
    image = result.json()["output"]["images"][0]
    clock.now += 29.9
    assert http.get(f"/v1/requests/{rid}/status").status_code == 200
    clock.now += 0.1
    expected = {
        "error_code": 404001,
        "error_message": f"request {rid} does not exist or has expired",
    }
    for method, action in (("GET", "status"), ("GET", "result"), ("POST", "cancel")):
        answer = http.request(method, f"/v1/requests/{rid}/{action}")
        assert (answer.status_code, answer.json()) == (404, expected), action
    assert admin.get(image).status_code == 200
    assert counters(admin)["expired"] == 3


def test_cli_flags_configure_the_server() -> None:
    port = free_port()
    code = "from worker.devtools.emulator.cli import emulator_command; emulator_command()"
    args = [
        "--port",
        str(port),
        "--max-concurrent",
        "1",
        "--max-submits-per-s",
        "100",
        "--balance",
        "1",
        "--account-errors-as-200",
        "--request-ttl-s",
        "600",
        "--retry-after-s",
        "2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        headers = {"Authorization": "Bearer cli"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            config = http.get("/_emulator/config").json()
            assert config["max_submits_per_s"] == 100
            assert config["request_ttl_s"] == 600
            assert http.post(SUBMIT, json={"prompt": "x"}, headers=headers).status_code == 200
            busy = http.post(SUBMIT, json={"prompt": "x"}, headers=headers)
            assert (busy.status_code, busy.headers["retry-after"]) == (429, "2")
            assert http.post("/_emulator/config", json={"max_concurrent": None}).is_success
            broke = http.post(SUBMIT, json={"prompt": "x"}, headers=headers)
            assert (broke.status_code, broke.json()) == (200, LOW_BALANCE)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
