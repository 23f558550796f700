"""RunComfyClient against the emulator over real HTTP: RunComfy error codes and the ambiguous
submit (what tests/unit/test_runcomfy_client.py checks on a MockTransport, end to end)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from api_contracts.inputs import GenerationInput
from worker.devtools.emulator import EmulatorConfig, EmulatorServer, FaultRule
from worker.errors import (
    AmbiguousSubmitError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    UpstreamAccountError,
    UpstreamError,
    UpstreamExpiredError,
    UpstreamProtocolError,
)
from worker.services.runcomfy import RunComfyClient
from worker.settings import RunComfySettings

pytestmark = pytest.mark.integration

SENTINEL = "sk-SENTINEL-codes-9e2f-never-print-me"
SINGLE = GenerationInput.model_validate({"prompt": "a lighthouse at dusk", "force_single": True})
ENDPOINTS = ["submit", "status", "result", "cancel"]


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[EmulatorServer]:
    """One fast emulator for the module."""
    config = EmulatorConfig(
        token=SENTINEL,
        queue_s=0.1,
        run_s=0.1,
        capacity=8,
        images_per_set=1,
        video=False,
        output_min_bytes=0,
        seed=1,
        faults=[],
        fault_rates={},
    )
    with EmulatorServer(config, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
def emu(emulator_server: EmulatorServer) -> EmulatorServer:
    """The emulator with no requests, counters, faults or config changes from earlier tests."""
    emulator_server.reset()
    return emulator_server


def make_client(emu: EmulatorServer, **overrides: Any) -> RunComfyClient:
    """A client on the emulator with the sentinel token."""
    values: dict[str, Any] = {
        "base_url": emu.base_url,
        "api_token": SecretStr(SENTINEL),
        "connect_timeout_s": 2.0,
        "read_timeout_s": 5.0,
    }
    values.update(overrides)
    return RunComfyClient(RunComfySettings(**values))


@pytest.fixture
def client(emu: EmulatorServer) -> Iterator[RunComfyClient]:
    """The client under test, pointed at ``emu``."""
    with make_client(emu) as rc:
        yield rc


def raises(expected: type[UpstreamError], call: Callable[[], object]) -> UpstreamError:
    """Run ``call``; require exactly ``expected``, which must not reveal the token."""
    with pytest.raises(expected) as info:
        call()
    err = info.value
    assert type(err) is expected
    assert SENTINEL not in str(err)
    assert SENTINEL not in repr(err)
    assert SENTINEL not in repr(vars(err))
    return err


def call_on(client: RunComfyClient, endpoint: str, request_id: str) -> Callable[[], object]:
    """The client call that hits ``endpoint``."""
    calls: dict[str, Callable[[], object]] = {
        "submit": lambda: client.submit(SINGLE),
        "status": lambda: client.status(request_id),
        "result": lambda: client.result(request_id),
        "cancel": lambda: client.cancel(request_id),
    }
    return calls[endpoint]


@pytest.mark.parametrize("as_200", [False, True])
def test_insufficient_balance_is_an_account_error(
    emu: EmulatorServer, client: RunComfyClient, as_200: bool
) -> None:
    emu.update_config(balance=1.0, cost_per_request=1.0, account_errors_as_200=as_200)
    client.submit(SINGLE)
    err = raises(UpstreamAccountError, lambda: client.submit(SINGLE))
    assert isinstance(err, UpstreamAccountError)
    assert err.error_code == 400002
    assert err.status_code == 400
    assert err.upstream_message is not None and "balance" in err.upstream_message
    assert emu.counters()["insufficient_balance"] == 1
    emu.top_up(1.0)
    client.submit(SINGLE)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (400002, UpstreamAccountError),
        (400004, UpstreamAccountError),
        (403001, UpstreamAccountError),
        (404001, UpstreamExpiredError),
        (400001, PermanentUpstreamError),
        (500001, RetryableUpstreamError),
        (777, UpstreamProtocolError),
    ],
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_error_code_with_200_on_every_endpoint(
    emu: EmulatorServer,
    client: RunComfyClient,
    endpoint: str,
    code: int,
    expected: type[UpstreamError],
) -> None:
    emu.update_config(queue_s=30)
    request_id = client.submit(SINGLE).request_id
    rule = FaultRule(
        kind="error_code_200", endpoint=endpoint, error_code=code, error_message=f"says {code}"
    )
    emu.set_faults([rule])
    call = call_on(client, endpoint, request_id)
    err = raises(expected, call)
    assert err.error_code == code
    assert err.upstream_message == f"says {code}"
    call()  # the fault was used up: the same call works again


def test_expired_request_id(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(request_ttl_s=0.2)
    request_id = client.submit(SINGLE).request_id
    deadline = time.monotonic() + 10
    while client.status(request_id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.4)
    for endpoint in ("status", "result", "cancel"):
        err = raises(UpstreamExpiredError, call_on(client, endpoint, request_id))
        assert isinstance(err, UpstreamExpiredError)
        assert err.status_code == 404
        assert err.error_code == 404001
        assert err.upstream_message is not None and "expired" in err.upstream_message


def test_slow_submit_is_ambiguous_and_upstream_did_accept_it(emu: EmulatorServer) -> None:
    emu.set_faults([FaultRule(kind="slow", endpoint="submit", delay_s=0.6)])
    with make_client(emu, read_timeout_s=0.15) as impatient:
        err = raises(AmbiguousSubmitError, lambda: impatient.submit(SINGLE))
    assert "ReadTimeout" in str(err)
    # The emulator created (and would have billed) the request: the case the error names.
    assert emu.counters()["faults"] == {"slow": 1}


def test_slow_status_is_plainly_retryable(emu: EmulatorServer, client: RunComfyClient) -> None:
    request_id = client.submit(SINGLE).request_id
    emu.set_faults([FaultRule(kind="slow", endpoint="status", delay_s=0.6)])
    with make_client(emu, read_timeout_s=0.15) as impatient:
        raises(RetryableUpstreamError, lambda: impatient.status(request_id))


def test_refused_connection_on_submit_is_plainly_retryable(emu: EmulatorServer) -> None:
    settings = RunComfySettings(
        base_url="http://127.0.0.1:9", api_token=SecretStr(SENTINEL), connect_timeout_s=1.0
    )
    with RunComfyClient(settings) as nowhere:
        err = raises(RetryableUpstreamError, lambda: nowhere.submit(SINGLE))
    assert "ConnectError" in str(err)
