"""RunComfyClient against the RunComfy emulator over real HTTP: every output shape, every fault."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api_contracts.inputs import GenerationInput
from api_contracts.upstream import StatusResponse
from worker.devtools.emulator import EmulatorConfig, EmulatorServer, FaultRule
from worker.errors import (
    AmbiguousSubmitError,
    NotCancellableError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    UpstreamAccountError,
    UpstreamError,
    UpstreamProtocolError,
)
from worker.services.runcomfy import RunComfyClient
from worker.settings import RunComfySettings

pytestmark = pytest.mark.integration

SENTINEL = "sk-SENTINEL-emu-4b1d-never-print-me"
FINAL = frozenset({"completed", "cancelled", "failed"})
SINGLE = GenerationInput.model_validate({"prompt": "a lighthouse at dusk", "force_single": True})
SET = GenerationInput.model_validate({"prompt": "four cats", "width×height": "1024x1024"})
ENDPOINTS = ["submit", "status", "result", "cancel"]


def config(**changes: Any) -> EmulatorConfig:
    """A fast emulator: short queue and run times, two images per set, no faults."""
    values: dict[str, Any] = {
        "token": SENTINEL,
        "queue_s": 0.1,
        "run_s": 0.2,
        "capacity": 8,
        "images_per_set": 2,
        "video": False,
        "output_min_bytes": 0,
        "seed": 1,
        "faults": [],
        "fault_rates": {},
    }
    values.update(changes)
    return EmulatorConfig(**values)


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Everything logged while a test ran (client, httpx, httpcore, emulator) is token-free."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert SENTINEL not in record.getMessage()
        if record.exc_info:
            assert SENTINEL not in "".join(traceback.format_exception(*record.exc_info))


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[EmulatorServer]:
    """One emulator for the module: starting and stopping one per test would dominate."""
    with EmulatorServer(config(), host="127.0.0.1", port=0) as server:
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
    """Run ``call``; require exactly ``expected``, whose text must not reveal the token."""
    with pytest.raises(expected) as info:
        call()
    err = info.value
    assert type(err) is expected
    assert SENTINEL not in str(err)
    assert SENTINEL not in repr(err)
    assert SENTINEL not in "".join(traceback.format_exception(err))
    return err


def poll(
    client: RunComfyClient, request_id: str, until: frozenset[str] = FINAL, timeout_s: float = 5.0
) -> list[StatusResponse]:
    """Status answers until one is in ``until`` (small sleeps; the emulator runs in ms)."""
    seen: list[StatusResponse] = []
    deadline = time.monotonic() + timeout_s
    while True:
        answer = client.status(request_id)
        seen.append(answer)
        if answer.status in until:
            return seen
        assert time.monotonic() < deadline, [s.status for s in seen]
        time.sleep(0.02)


def collapse(states: list[str]) -> list[str]:
    """Drop consecutive repeats: the states a request went through, in order."""
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


# --- the happy path, every output shape ---------------------------------------------------


def test_lifecycle_single_image(emu: EmulatorServer, client: RunComfyClient) -> None:
    # Long enough in_progress that 20 ms polls see it even on a loaded machine.
    emu.update_config(capacity=1, run_s=0.4)
    first = client.submit(SINGLE)
    second = client.submit(SINGLE)
    assert first.request_id != second.request_id
    assert first.status_url == f"{emu.base_url}/v1/requests/{first.request_id}/status"
    assert first.cancel_url == f"{emu.base_url}/v1/requests/{first.request_id}/cancel"

    queued = client.status(second.request_id)
    assert (queued.status, queued.queue_position) == ("in_queue", 1)
    early = client.result(first.request_id)
    assert early.status == "in_queue"
    assert early.output is None

    seen = poll(client, first.request_id)
    assert collapse([s.status for s in seen]) == ["in_queue", "in_progress", "completed"]
    assert seen[0].queue_position == 0
    assert all(s.queue_position is None for s in seen if s.status != "in_queue")

    done = client.result(first.request_id)
    assert done.status == "completed"
    assert done.output is not None
    assert done.output.image == f"{emu.base_url}/files/{first.request_id}/0.png"
    assert done.output.images is None
    assert [kind for kind, _ in done.output.media()] == ["image"]
    assert poll(client, second.request_id)[-1].status == "completed"


def test_set_of_images(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(queue_s=0, run_s=0)
    request_id = client.submit(SET).request_id
    assert poll(client, request_id)[-1].status == "completed"
    output = client.result(request_id).output
    assert output is not None
    assert output.image is None
    assert output.images is not None
    assert len(output.images) == 2
    assert [kind for kind, _ in output.media()] == ["image", "image"]


@pytest.mark.parametrize(
    ("inp", "kinds"),
    [(SINGLE, ["image", "video"]), (SET, ["image", "image", "video", "video"])],
    ids=["image+video", "images+videos"],
)
def test_video_outputs(
    emu: EmulatorServer, client: RunComfyClient, inp: GenerationInput, kinds: list[str]
) -> None:
    emu.update_config(video=True, queue_s=0, run_s=0)
    request_id = client.submit(inp).request_id
    poll(client, request_id)
    output = client.result(request_id).output
    assert output is not None
    assert [kind for kind, _ in output.media()] == kinds
    if inp.force_single:
        assert output.video is not None
        assert output.video.endswith("/0.mp4")
    else:
        assert output.videos is not None
        assert len(output.videos) == 2


# --- cancel -------------------------------------------------------------------------------


def test_cancel_while_queued(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(queue_s=30)
    request_id = client.submit(SINGLE).request_id
    answer = client.cancel(request_id)
    assert answer.status == "cancelled"
    assert answer.request_id == request_id
    assert client.status(request_id).status == "cancelled"
    assert client.result(request_id).output is None
    assert client.cancel(request_id).status == "cancelled"  # idempotent
    assert emu.counters()["cancelled_by_client"] == 1


def test_cancel_in_progress_is_refused(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(queue_s=0, run_s=30)
    request_id = client.submit(SINGLE).request_id
    poll(client, request_id, until=frozenset({"in_progress"}))
    err = raises(NotCancellableError, lambda: client.cancel(request_id))
    assert isinstance(err, NotCancellableError)
    assert err.status_code == 409
    assert "in progress" in str(err)
    assert client.status(request_id).status == "in_progress"


def test_cancel_after_completion_is_refused(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(queue_s=0, run_s=0)
    request_id = client.submit(SINGLE).request_id
    poll(client, request_id)
    err = raises(NotCancellableError, lambda: client.cancel(request_id))
    assert "already finished" in str(err)


# --- faults -------------------------------------------------------------------------------


def call_on(client: RunComfyClient, endpoint: str, request_id: str) -> Callable[[], object]:
    """The client call that hits ``endpoint``."""
    calls: dict[str, Callable[[], object]] = {
        "submit": lambda: client.submit(SINGLE),
        "status": lambda: client.status(request_id),
        "result": lambda: client.result(request_id),
        "cancel": lambda: client.cancel(request_id),
    }
    return calls[endpoint]


@pytest.fixture
def queued_id(emu: EmulatorServer, client: RunComfyClient) -> str:
    """A request that stays in the queue (so cancel succeeds), submitted before any fault."""
    emu.update_config(queue_s=30)
    return client.submit(SINGLE).request_id


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_429_is_retryable_with_retry_after(
    emu: EmulatorServer, client: RunComfyClient, queued_id: str, endpoint: str
) -> None:
    emu.set_faults([FaultRule(kind="429", endpoint=endpoint, times=2, retry_after_s=0.5)])
    call = call_on(client, endpoint, queued_id)
    for _ in range(2):
        err = raises(RetryableUpstreamError, call)
        assert isinstance(err, RetryableUpstreamError)
        assert err.status_code == 429
        assert err.retry_after_s == 0.5
        assert "too many requests" in str(err)
    call()  # the rule is used up
    assert emu.counters()["faults"] == {"429": 2}


@pytest.mark.parametrize("kind", ["500", "502", "503"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_5xx_is_retryable(
    emu: EmulatorServer, client: RunComfyClient, queued_id: str, endpoint: str, kind: str
) -> None:
    emu.set_faults([FaultRule.model_validate({"kind": kind, "endpoint": endpoint})])
    call = call_on(client, endpoint, queued_id)
    err = raises(RetryableUpstreamError, call)
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code == int(kind)
    assert err.retry_after_s is None
    call()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_slow_answer_times_out_as_retryable(
    emu: EmulatorServer, client: RunComfyClient, queued_id: str, endpoint: str
) -> None:
    emu.set_faults([FaultRule(kind="slow", endpoint=endpoint, delay_s=0.6)])
    # A submit that was sent and timed out is ambiguous: upstream may have accepted it.
    expected = AmbiguousSubmitError if endpoint == "submit" else RetryableUpstreamError
    with make_client(emu, read_timeout_s=0.15) as impatient:
        err = raises(expected, call_on(impatient, endpoint, queued_id))
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code is None
    assert "timed out" in str(err)
    assert "ReadTimeout" in str(err)
    call_on(client, endpoint, queued_id)()  # no fault left
    # The emulator acted on the call; only the answer was late (the ambiguous case).
    assert emu.counters()["faults"] == {"slow": 1}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_json_is_a_protocol_error(
    emu: EmulatorServer, client: RunComfyClient, queued_id: str, endpoint: str
) -> None:
    emu.set_faults([FaultRule(kind="malformed_json", endpoint=endpoint)])
    call = call_on(client, endpoint, queued_id)
    err = raises(UpstreamProtocolError, call)
    assert "not JSON" in str(err)
    call()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_connection_reset_is_retryable(
    emu: EmulatorServer, client: RunComfyClient, queued_id: str, endpoint: str
) -> None:
    emu.set_faults([FaultRule(kind="reset", endpoint=endpoint)])
    call = call_on(client, endpoint, queued_id)
    expected = AmbiguousSubmitError if endpoint == "submit" else RetryableUpstreamError
    err = raises(expected, call)
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code is None
    assert any(name in str(err) for name in ("RemoteProtocolError", "ReadError"))
    call()  # the pool drops the dead connection and opens a new one


def test_upstream_cancels_the_request(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.set_faults([FaultRule(kind="cancel", endpoint="submit")])
    request_id = client.submit(SINGLE).request_id
    seen = poll(client, request_id)
    assert seen[-1].status == "cancelled"
    result = client.result(request_id)
    assert result.status == "cancelled"
    assert result.output is None


def test_generation_fails(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.set_faults([FaultRule(kind="fail", endpoint="submit")])
    request_id = client.submit(SINGLE).request_id
    seen = poll(client, request_id)
    assert seen[-1].status == "failed"
    assert set(collapse([s.status for s in seen])) <= {"in_queue", "in_progress", "failed"}
    assert seen[-1].error == {
        "code": "generation_failed",
        "message": "generation failed (emulated)",
    }
    result = client.result(request_id)
    assert result.status == "failed"
    assert result.output is None


def test_output_404_leaves_the_result_intact(emu: EmulatorServer, client: RunComfyClient) -> None:
    emu.update_config(queue_s=0, run_s=0)
    emu.set_faults([FaultRule(kind="output_404", endpoint="submit")])
    request_id = client.submit(SINGLE).request_id
    poll(client, request_id)
    output = client.result(request_id).output
    assert output is not None
    assert output.image is not None
    # Fetching outputs is the archiver's job; the client only hands over the URL.
    assert httpx.get(output.image).status_code == 404


# --- permanent errors ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_wrong_token_is_permanent(emu: EmulatorServer, queued_id: str, endpoint: str) -> None:
    with make_client(emu, api_token=SecretStr("wrong-token")) as intruder:
        err = raises(UpstreamAccountError, call_on(intruder, endpoint, queued_id))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 401
    assert "invalid Bearer token" in str(err)
    assert emu.counters()["unauthorized"] == 1


def test_missing_token_is_permanent(emu: EmulatorServer) -> None:
    with make_client(emu, api_token=None) as anonymous:
        err = raises(UpstreamAccountError, lambda: anonymous.submit(SINGLE))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 401


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"scale": 5.0}, "scale"),
        ({"prompt": "x" * 801}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"size": "999x999"}, "width×height"),
    ],
)
def test_invalid_body_is_permanent_and_names_the_field(
    emu: EmulatorServer, client: RunComfyClient, bad: dict[str, Any], field: str
) -> None:
    # model_construct skips our own validation, so the bad body really reaches upstream.
    values: dict[str, Any] = {
        "prompt": "a fox",
        "size": "2048x2048(1:1)",
        "scale": 0.5,
        "force_single": False,
    }
    values.update(bad)
    raw = GenerationInput.model_construct(**values)
    err = raises(PermanentUpstreamError, lambda: client.submit(raw))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 422
    assert f"{field}:" in str(err)
    assert emu.counters()["requests"]["in_queue"] == 0


@pytest.mark.parametrize("name", ["status", "result", "cancel"])
@pytest.mark.parametrize("request_id", ["no-such-request", "a/b c?d"])
def test_unknown_request_is_permanent(client: RunComfyClient, name: str, request_id: str) -> None:
    err = raises(PermanentUpstreamError, lambda: getattr(client, name)(request_id))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 404
    assert "no request" in str(err)
    assert repr(request_id) in str(err)  # the quoted id arrived intact


def test_unknown_model_is_permanent(emu: EmulatorServer) -> None:
    with make_client(emu, model_id="bytedance/no-such-model") as lost:
        err = raises(PermanentUpstreamError, lambda: lost.submit(SINGLE))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 404
    assert "no model" in str(err)


def test_server_gone_is_retryable() -> None:
    with EmulatorServer(config(), host="127.0.0.1", port=0) as gone:
        client = make_client(gone, connect_timeout_s=0.5)
    with client:
        err = raises(RetryableUpstreamError, lambda: client.status("r"))
    assert "ConnectError" in str(err)
