"""The RunComfy emulator over real HTTP: paths, auth, shapes, lifecycle, files, faults, admin."""

from __future__ import annotations

import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api_contracts.inputs import SIZE_KEY
from api_contracts.upstream import ResultResponse, StatusResponse, SubmitResponse
from worker.devtools.embedded import free_port, wait_for_port
from worker.devtools.emulator import EmulatorConfig, EmulatorServer, FaultRule
from worker.devtools.emulator.png import PAD_CHUNK_TYPE

pytestmark = pytest.mark.integration

TOKEN = "emu-test-token"
MODEL = "bytedance/dreamina-4-0/text-to-image"
SUBMIT = f"/v1/models/{MODEL}"
OUTPUT_KEYS = {"image", "images", "video", "videos"}  # upstream's output schema
FINAL = {"completed", "cancelled", "failed"}
CONFIG = EmulatorConfig(token=TOKEN, queue_s=0.05, run_s=0.1, capacity=4, seed=3)


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    """One emulator for the module; each test resets it."""
    with EmulatorServer(CONFIG, host="127.0.0.1", port=0) as emu:
        yield emu


@pytest.fixture
def emu(server: EmulatorServer) -> EmulatorServer:
    """The emulator as configured above, with no requests, counters or leftover faults."""
    server.reset()
    return server


@pytest.fixture
def http(emu: EmulatorServer) -> Iterator[httpx.Client]:
    """An authenticated keep-alive client."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=emu.base_url, headers=headers, timeout=5.0) as client:
        yield client


@pytest.fixture
def admin(emu: EmulatorServer) -> Iterator[httpx.Client]:
    """A client without credentials, for files and the admin endpoints."""
    with httpx.Client(base_url=emu.base_url, timeout=5.0) as client:
        yield client


def submit(http: httpx.Client, **body: Any) -> str:
    answer = http.post(SUBMIT, json={"prompt": "a red fox in snow", **body})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["request_id"])


def wait_for(
    http: httpx.Client, rid: str, states: set[str], timeout_s: float = 3.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = http.get(f"/v1/requests/{rid}/status").json()
        if answer["status"] in states:
            return dict(answer)
        assert time.monotonic() < deadline, answer
        time.sleep(0.01)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_chunks(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(data[pos + 4 : pos + 8 + length]) == crc
        kinds.append(kind)
        pos += 12 + length
    return kinds


def png_walk(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        yield pos, length, data[pos + 4 : pos + 8]
        pos += 12 + length


# --- shapes --------------------------------------------------------------------------------


def test_submit_answer_shape(emu: EmulatorServer, http: httpx.Client) -> None:
    answer = http.post(SUBMIT, json={"prompt": "x"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"request_id", "status_url", "result_url", "cancel_url"}
    rid = body["request_id"]
    base = f"{emu.base_url}/v1/requests/{rid}"
    assert body["status_url"] == f"{base}/status"
    assert body["result_url"] == f"{base}/result"
    assert body["cancel_url"] == f"{base}/cancel"
    SubmitResponse.model_validate(body)


def test_status_and_result_while_queued(http: httpx.Client) -> None:
    rid = submit(http)
    status = http.get(f"/v1/requests/{rid}/status").json()
    assert set(status) == {"request_id", "status", "queue_position", "status_url", "result_url"}
    assert status["status"] == "in_queue"
    assert status["queue_position"] == 0
    StatusResponse.model_validate(status)
    result = http.get(f"/v1/requests/{rid}/result")
    assert result.status_code == 200
    assert result.json()["status"] in ("in_queue", "in_progress")
    assert "output" not in result.json()


def test_single_image_lifecycle_and_file(http: httpx.Client, admin: httpx.Client) -> None:
    rid = submit(http, force_single=True, **{SIZE_KEY: "2304x1728(4:3)"})
    seen = wait_for(http, rid, {"in_progress"})
    assert "queue_position" not in seen
    wait_for(http, rid, FINAL)
    result = http.get(f"/v1/requests/{rid}/result").json()
    assert result["status"] == "completed"
    assert set(result["output"]) == {"image"}
    assert set(result["output"]) <= OUTPUT_KEYS
    assert ResultResponse.model_validate(result).output is not None
    picture = admin.get(result["output"]["image"])
    assert picture.status_code == 200
    assert picture.headers["content-type"] == "image/png"
    assert int(picture.headers["content-length"]) == len(picture.content)
    assert png_size(picture.content) == (2304, 1728)


def test_set_of_images_small_png_decodes(
    emu: EmulatorServer, http: httpx.Client, admin: httpx.Client
) -> None:
    emu.update_config(images_per_set=3)
    rid = submit(http, **{SIZE_KEY: "1024x1024"})
    wait_for(http, rid, FINAL)
    output = http.get(f"/v1/requests/{rid}/result").json()["output"]
    assert set(output) == {"images"}
    assert len(output["images"]) == 3
    bodies = [admin.get(url).content for url in output["images"]]
    assert len(set(bodies)) == 3  # each image of a set looks different
    for data in bodies:
        assert png_size(data) == (1024, 1024)
        kinds = png_chunks(data)
        assert kinds[0] == b"IHDR"
        assert kinds[-1] == b"IEND"
    idat = b"".join(
        data[pos + 8 : pos + 8 + n] for pos, n, kind in png_walk(bodies[0]) if kind == b"IDAT"
    )
    assert len(zlib.decompress(idat)) == 1024 * (1024 * 3 + 1)


def test_largest_size_is_served_with_exact_dimensions(
    http: httpx.Client, admin: httpx.Client
) -> None:
    rid = submit(http, force_single=True, **{SIZE_KEY: "6198x2656(21:9)"})
    wait_for(http, rid, FINAL)
    url = http.get(f"/v1/requests/{rid}/result").json()["output"]["image"]
    started = time.monotonic()
    picture = admin.get(url)
    assert time.monotonic() - started < 3.0
    assert png_size(picture.content) == (6198, 2656)


def test_video_outputs(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    emu.update_config(video=True)
    single = submit(http, force_single=True)
    several = submit(http)
    wait_for(http, several, FINAL)
    wait_for(http, single, FINAL)
    out_single = http.get(f"/v1/requests/{single}/result").json()["output"]
    out_several = http.get(f"/v1/requests/{several}/result").json()["output"]
    assert set(out_single) == {"image", "video"}
    assert set(out_several) == {"images", "videos"}
    movie = admin.get(out_single["video"])
    assert movie.headers["content-type"] == "video/mp4"
    assert movie.content[4:8] == b"ftyp"


def test_padding_streams_large_files(
    emu: EmulatorServer, http: httpx.Client, admin: httpx.Client
) -> None:
    emu.update_config(output_min_bytes=8 * 1024 * 1024)
    rid = submit(http, force_single=True, **{SIZE_KEY: "1024x1024"})
    wait_for(http, rid, FINAL)
    url = http.get(f"/v1/requests/{rid}/result").json()["output"]["image"]
    head = admin.head(url)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == 8 * 1024 * 1024
    assert head.content == b""
    data = admin.get(url).content
    assert len(data) == 8 * 1024 * 1024
    assert png_size(data) == (1024, 1024)
    assert PAD_CHUNK_TYPE in png_chunks(data)


# --- auth, 404, 405, 422 ---------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer", "Basic abc", TOKEN])
def test_bad_credentials_get_401_everywhere(
    http: httpx.Client, admin: httpx.Client, authorization: str | None
) -> None:
    rid = submit(http)
    headers = {"Authorization": authorization} if authorization else {}
    calls = [
        ("POST", SUBMIT),
        ("GET", f"/v1/requests/{rid}/status"),
        ("GET", f"/v1/requests/{rid}/result"),
        ("POST", f"/v1/requests/{rid}/cancel"),
    ]
    for method, path in calls:
        answer = admin.request(method, path, headers=headers, json={"prompt": "x"})
        assert answer.status_code == 401, (method, path)
        assert answer.json()["error"]["code"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")


def test_any_token_when_none_configured() -> None:
    with (
        EmulatorServer(EmulatorConfig(token=None)) as emu,
        httpx.Client(base_url=emu.base_url) as client,
    ):
        ok = client.post(SUBMIT, json={"prompt": "x"}, headers={"Authorization": "Bearer any"})
        assert ok.status_code == 200
        assert client.post(SUBMIT, json={"prompt": "x"}).status_code == 401


def test_unknown_model_request_and_path_are_404(http: httpx.Client) -> None:
    answer = http.post("/v1/models/bytedance/nope", json={"prompt": "x"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"
    for action in ("status", "result"):
        assert http.get(f"/v1/requests/nope/{action}").status_code == 404
    assert http.post("/v1/requests/nope/cancel").status_code == 404
    answer = http.get("/v2/whatever")
    assert answer.status_code == 404
    assert "error" in answer.json()


def test_wrong_method_is_405(http: httpx.Client) -> None:
    rid = submit(http)
    answer = http.post(f"/v1/requests/{rid}/status")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"
    assert http.get(SUBMIT).status_code == 405


@pytest.mark.parametrize(
    ("body", "field", "why"),
    [
        ({}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "at least 1"),
        ({"prompt": "x" * 801}, "prompt", "at most 800"),
        ({"prompt": "x", SIZE_KEY: "999x999"}, SIZE_KEY, "not an allowed size"),
        ({"prompt": "x", "scale": 2}, "scale", "less than or equal"),
        ({"prompt": "x", "force_single": "yes"}, "force_single", "boolean"),
        ({"prompt": "x", "colour": "red"}, "colour", "not permitted"),
        ([1, 2], "body", "dictionary"),
    ],
)
def test_invalid_body_is_422_naming_the_field(
    http: httpx.Client, body: Any, field: str, why: str
) -> None:
    answer = http.post(SUBMIT, json=body)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["message"]
    assert why in error["message"]
    assert any(d["field"] == field for d in error["details"])


def test_unparseable_body_is_400(http: httpx.Client) -> None:
    answer = http.post(SUBMIT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


def test_short_size_form_is_accepted(http: httpx.Client) -> None:
    assert http.post(SUBMIT, json={"prompt": "x", SIZE_KEY: "2560x1440"}).status_code == 200


# --- lifecycle -----------------------------------------------------------------------------


def test_queue_position_falls_and_capacity_holds(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.update_config(capacity=2, queue_s=0.0, run_s=0.25)
    ids = [submit(http) for _ in range(5)]
    positions: dict[str, list[int]] = {rid: [] for rid in ids}
    max_running = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # One consistent snapshot: statuses fetched one by one may straddle a hand-over.
        max_running = max(max_running, emu.counters()["requests"]["in_progress"])
        states = [http.get(f"/v1/requests/{rid}/status").json() for rid in ids]
        for rid, s in zip(ids, states, strict=True):
            if s["status"] == "in_queue":
                positions[rid].append(s["queue_position"])
        if all(s["status"] == "completed" for s in states):
            break
        time.sleep(0.02)
    assert max_running == 2
    last = positions[ids[-1]]
    assert last[0] == 2  # two ahead of it in the line once the first two started
    assert last == sorted(last, reverse=True)
    assert 0 in last


def test_minimum_queue_time(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.update_config(queue_s=0.3)
    started = time.monotonic()
    rid = submit(http)
    wait_for(http, rid, {"in_progress", "completed"})
    assert time.monotonic() - started >= 0.29


def test_cancel_in_queue_then_refused_later(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.update_config(capacity=1, queue_s=0.0, run_s=0.3)
    running = submit(http)
    queued = submit(http)
    answer = http.post(f"/v1/requests/{queued}/cancel")
    assert answer.status_code == 200
    assert answer.json() == {"request_id": queued, "status": "cancelled"}
    assert http.get(f"/v1/requests/{queued}/status").json()["status"] == "cancelled"
    assert http.get(f"/v1/requests/{queued}/result").json()["status"] == "cancelled"
    refused = http.post(f"/v1/requests/{running}/cancel")
    assert refused.status_code == 409
    assert "in progress" in refused.json()["error"]["message"]
    wait_for(http, running, FINAL)
    refused = http.post(f"/v1/requests/{running}/cancel")
    assert refused.status_code == 409
    assert "already finished" in refused.json()["error"]["message"]


# --- faults -------------------------------------------------------------------------------


def test_429_with_retry_after_for_the_next_n_calls(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)
    emu.set_faults([FaultRule(kind="429", endpoint="status", times=2, retry_after_s=3)])
    for _ in range(2):
        answer = http.get(f"/v1/requests/{rid}/status")
        assert answer.status_code == 429
        assert answer.headers["retry-after"] == "3"
        assert answer.json()["error"]["code"] == "rate_limited"
    assert http.get(f"/v1/requests/{rid}/status").status_code == 200
    assert emu.counters()["faults"] == {"429": 2}


@pytest.mark.parametrize("kind", ["500", "502", "503"])
@pytest.mark.parametrize("endpoint", ["submit", "status", "result", "cancel"])
def test_server_errors_on_every_endpoint(
    emu: EmulatorServer, http: httpx.Client, kind: str, endpoint: str
) -> None:
    # still queued (cancellable, counted in_queue) however slow this machine is
    emu.update_config(queue_s=30)
    rid = submit(http)
    emu.set_faults([FaultRule.model_validate({"kind": kind, "endpoint": endpoint})])
    method, path = {
        "submit": ("POST", SUBMIT),
        "status": ("GET", f"/v1/requests/{rid}/status"),
        "result": ("GET", f"/v1/requests/{rid}/result"),
        "cancel": ("POST", f"/v1/requests/{rid}/cancel"),
    }[endpoint]
    answer = http.request(method, path, json={"prompt": "x"})
    assert answer.status_code == int(kind)
    assert "error" in answer.json()
    assert http.request(method, path, json={"prompt": "x"}).status_code == 200
    if endpoint == "submit":
        assert emu.counters()["requests"]["in_queue"] == 2  # the failed submit created nothing


def test_slow_answer_times_out_the_client(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)
    emu.set_faults([FaultRule(kind="slow", endpoint="status", delay_s=0.5)])
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"/v1/requests/{rid}/status", timeout=0.2)
    started = time.monotonic()
    emu.set_faults([FaultRule(kind="slow", endpoint="status", delay_s=0.2)])
    assert http.get(f"/v1/requests/{rid}/status").status_code == 200
    assert time.monotonic() - started >= 0.19


def test_malformed_json_with_200(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([FaultRule(kind="malformed_json", endpoint="submit")])
    answer = http.post(SUBMIT, json={"prompt": "x"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.content)
    # Upstream did the work; only the answer was garbled.
    assert emu.counters()["requests"]["in_queue"] == 1


def test_connection_reset(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)
    emu.set_faults([FaultRule(kind="reset", endpoint="status")])
    with pytest.raises(httpx.TransportError):
        http.get(f"/v1/requests/{rid}/status")
    assert http.get(f"/v1/requests/{rid}/status").status_code == 200


def test_reset_is_a_tcp_rst(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)
    emu.set_faults([FaultRule(kind="reset", endpoint="status")])
    port = int(emu.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(
            f"GET /v1/requests/{rid}/status HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_spontaneous_cancel(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([FaultRule(kind="cancel", endpoint="submit")])
    rid = submit(http)
    states = wait_for(http, rid, FINAL)
    assert states["status"] == "cancelled"
    assert http.get(f"/v1/requests/{rid}/result").json()["status"] == "cancelled"


def test_failed_generation(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([FaultRule(kind="fail")])
    rid = submit(http)
    status = wait_for(http, rid, FINAL)
    assert status["status"] == "failed"
    assert set(status["error"]) >= {"code", "message"}
    result = http.get(f"/v1/requests/{rid}/result").json()
    assert result == status
    assert "output" not in result


def test_output_urls_that_404(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    emu.set_faults([FaultRule(kind="output_404", endpoint="submit")])
    broken = submit(http, force_single=True)
    fine = submit(http, force_single=True)
    wait_for(http, broken, FINAL)
    wait_for(http, fine, FINAL)
    url = http.get(f"/v1/requests/{broken}/result").json()["output"]["image"]
    assert admin.get(url).status_code == 404
    good = http.get(f"/v1/requests/{fine}/result").json()["output"]["image"]
    emu.set_faults([FaultRule(kind="output_404", endpoint="download", times=1)])
    assert admin.get(good).status_code == 404
    assert admin.get(good).status_code == 200


@pytest.mark.parametrize("kind", ["429", "503", "slow", "malformed_json", "reset"])
def test_call_faults_on_downloads(
    emu: EmulatorServer, http: httpx.Client, admin: httpx.Client, kind: str
) -> None:
    rid = submit(http, force_single=True)
    wait_for(http, rid, FINAL)
    url = http.get(f"/v1/requests/{rid}/result").json()["output"]["image"]
    full = admin.get(url).content
    emu.set_faults(
        [FaultRule.model_validate({"kind": kind, "endpoint": "download", "delay_s": 0.1})]
    )
    if kind == "reset":
        with pytest.raises(httpx.TransportError):
            admin.get(url)
    else:
        answer = admin.get(url)
        expected = {"429": 429, "503": 503}.get(kind, 200)
        assert answer.status_code == expected
        if kind == "slow":
            assert answer.content == full
        if kind == "malformed_json":
            assert 0 < len(answer.content) < len(full)
    assert admin.get(url).content == full


def test_download_of_unknown_or_unfinished_files_is_404(
    emu: EmulatorServer, http: httpx.Client, admin: httpx.Client
) -> None:
    emu.update_config(queue_s=5.0)
    rid = submit(http)
    assert admin.get(f"/files/{rid}/0.png").status_code == 404  # not finished yet
    assert admin.get("/files/nope/0.png").status_code == 404
    assert admin.get(f"/files/{rid}/x.gif").status_code == 404


def test_seeded_rates_are_reproducible(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)

    def run() -> list[int]:
        emu.set_faults([], rates={"500@status": 0.3, "503@status": 0.2}, seed=42)
        return [http.get(f"/v1/requests/{rid}/status").status_code for _ in range(60)]

    first = run()
    assert first == run()
    assert {200, 500, 503} == set(first)
    emu.set_faults([], rates={}, seed=42)
    assert all(http.get(f"/v1/requests/{rid}/status").status_code == 200 for _ in range(5))


def test_per_request_rates(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([], rates={"fail": 1.0}, seed=1)
    rid = submit(http)
    assert wait_for(http, rid, FINAL)["status"] == "failed"


# --- counters and admin -------------------------------------------------------------------


def test_counters(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    rid = submit(http, force_single=True)
    other = submit(http)
    http.post(f"/v1/requests/{other}/cancel")
    wait_for(http, rid, FINAL)
    http.get(f"/v1/requests/{rid}/result")
    url = http.get(f"/v1/requests/{rid}/result").json()["output"]["image"]
    admin.get(url)
    emu.set_faults([FaultRule(kind="503", endpoint="status")])
    http.get(f"/v1/requests/{other}/status")
    counters = admin.get("/_emulator/counters").json()
    assert counters == emu.counters()
    assert counters["submits"] == 2
    assert counters["status_calls"] == sum(counters["status_calls_by_request"].values())
    assert counters["status_calls_by_request"][other] == 1
    assert counters["result_calls"] == 2
    assert counters["result_calls_by_request"] == {rid: 2}
    assert counters["cancels"] == 1
    assert counters["downloads"] == 1
    assert counters["downloads_by_request"] == {rid: 1}
    assert counters["faults"] == {"503": 1}
    assert counters["faults_total"] == 1
    assert counters["responses"]["503"] == 1
    assert counters["requests"]["completed"] == 1
    assert counters["requests"]["cancelled"] == 1
    assert counters["cancelled_by_client"] == 1


def test_admin_reset(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    rid = submit(http)
    emu.update_config(run_s=9.0)
    assert admin.post("/_emulator/reset").json() == {"ok": True}
    assert http.get(f"/v1/requests/{rid}/status").status_code == 404
    assert emu.counters()["submits"] == 0
    assert admin.get("/_emulator/config").json()["run_s"] == CONFIG.run_s


def test_admin_faults(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    rid = submit(http)
    answer = admin.post(
        "/_emulator/faults",
        json={
            "rules": [{"kind": "502", "endpoint": "result", "times": 1}],
            "rates": {"slow@cancel": 0.5},
            "seed": 9,
        },
    )
    assert answer.status_code == 200
    snapshot = answer.json()
    assert snapshot["rules"][0]["kind"] == "502"
    assert snapshot["rules"][0]["left"] == 1
    assert snapshot["rates"] == {"slow@cancel": 0.5}
    assert snapshot["seed"] == 9
    assert http.get(f"/v1/requests/{rid}/result").status_code == 502
    assert admin.get("/_emulator/faults").json()["rules"][0]["left"] == 0
    # A bare list replaces the rules only.
    admin.post("/_emulator/faults", json=[{"kind": "503", "endpoint": "status"}])
    assert admin.get("/_emulator/faults").json()["rates"] == {"slow@cancel": 0.5}
    assert http.get(f"/v1/requests/{rid}/status").status_code == 503
    bad = admin.post("/_emulator/faults", json={"rules": [{"kind": "teapot"}]})
    assert bad.status_code == 422
    assert "kind" in bad.json()["error"]["message"]


def test_admin_config(emu: EmulatorServer, http: httpx.Client, admin: httpx.Client) -> None:
    answer = admin.post(
        "/_emulator/config", json={"images_per_set": 4, "queue_s": 0.0, "run_s": 0.0}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["images_per_set"] == 4
    assert body["token"] == "***"
    assert emu.config.images_per_set == 4
    rid = submit(http)
    wait_for(http, rid, FINAL)
    assert len(http.get(f"/v1/requests/{rid}/result").json()["output"]["images"]) == 4
    bad = admin.post("/_emulator/config", json={"images_per_set": 5})
    assert bad.status_code == 422
    assert "images_per_set" in bad.json()["error"]["message"]
    assert admin.post("/_emulator/config", json={"nope": 1}).status_code == 422
    emu.update_config(token="rotated")
    assert http.post(SUBMIT, json={"prompt": "x"}).status_code == 401


def test_admin_requests_and_unknown(http: httpx.Client, admin: httpx.Client) -> None:
    rid = submit(http, **{SIZE_KEY: "1024x1024"})
    listing = admin.get("/_emulator/requests").json()
    assert listing[0]["request_id"] == rid
    assert listing[0]["size"] == "1024x1024"
    assert admin.get("/_emulator/health").json() == {"ok": True}
    assert admin.get("/_emulator/nothing").status_code == 404


# --- HTTP plumbing ------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(emu: EmulatorServer, http: httpx.Client) -> None:
    rid = submit(http)
    ports = set()
    for _ in range(20):
        answer = http.get(f"/v1/requests/{rid}/status", extensions={"trace": None})
        assert answer.http_version == "HTTP/1.1"
        ports.add(answer.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1


def test_malformed_http_gets_a_json_400(emu: EmulatorServer) -> None:
    port = int(emu.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert "error" in json.loads(body)


def test_chunked_and_expect_continue_bodies(emu: EmulatorServer) -> None:
    port = int(emu.base_url.rsplit(":", 1)[1])
    payload = json.dumps({"prompt": "chunky"}).encode()
    request = (
        (
            f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + f"{len(payload):x}\r\n".encode()
        + payload
        + b"\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert b"request_id" in data


def test_one_log_line_per_request_without_the_token(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.devtools.emulator")
    submit(http)
    deadline = time.monotonic() + 2
    while True:  # the line is written once the answer is sent, so it may trail the answer
        lines = [r.getMessage() for r in caplog.records if r.name == "worker.devtools.emulator"]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(lines) == 1
    assert lines[0].startswith(f"POST {SUBMIT} -> 200")
    assert TOKEN not in lines[0]


def test_close_ends_idle_keep_alive_connections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    emu = EmulatorServer(EmulatorConfig()).start()
    with httpx.Client(base_url=emu.base_url) as client:
        assert client.get("/_emulator/health").status_code == 200
        emu.close()
        with pytest.raises(httpx.TransportError):
            client.get("/_emulator/health")
    # Closing with connections open is routine: no traceback (CPython gh-113538 logged one
    # for every handler cancelled while it waited for the next request).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_port_in_use_raises() -> None:
    with EmulatorServer() as first, pytest.raises(OSError, match="in use"):
        EmulatorServer(port=first.port).start()


def test_cli_serves_until_sigterm() -> None:
    port = free_port()
    code = "from worker.devtools.emulator.cli import emulator_command; emulator_command()"
    args = ["--port", str(port), "--token", "cli", "--queue-s", "0", "--fault-rate", "503@cancel=1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            answer = client.post(
                SUBMIT, json={"prompt": "x"}, headers={"Authorization": "Bearer cli"}
            )
            assert answer.status_code == 200
            rid = answer.json()["request_id"]
            cancel = client.post(
                f"/v1/requests/{rid}/cancel", headers={"Authorization": "Bearer cli"}
            )
            assert cancel.status_code == 503
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert f"listening on http://127.0.0.1:{port}" in output
    assert f"POST {SUBMIT} -> 200" in output
    assert "Bearer" not in output
