"""RunComfyClient on httpx.MockTransport: the protocol as handler functions, errors as tables."""

from __future__ import annotations

import json
import logging
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api_contracts.inputs import SIZE_KEY, GenerationInput
from api_contracts.upstream import CancelResponse, ResultResponse, StatusResponse, SubmitResponse
from worker import __version__
from worker.errors import (
    AmbiguousSubmitError,
    NotCancellableError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    UpstreamAccountError,
    UpstreamError,
    UpstreamExpiredError,
    UpstreamProtocolError,
)
from worker.services.runcomfy import RunComfyClient, classify_response, parse_retry_after
from worker.settings import RunComfySettings

SENTINEL = "sk-SENTINEL-7f3a9c-never-print-me"
BASE = "https://upstream.test"
MODEL_PATH = "/v1/models/bytedance/dreamina-4-0/text-to-image"

Handler = Callable[[httpx.Request], httpx.Response]


def make_settings(**overrides: Any) -> RunComfySettings:
    """Settings with every field the client reads set explicitly (no environment leaks in)."""
    values: dict[str, Any] = {
        "base_url": BASE,
        "api_token": SecretStr(SENTINEL),
        "model_id": "bytedance/dreamina-4-0/text-to-image",
        "connect_timeout_s": 2.5,
        "read_timeout_s": 7.0,
    }
    values.update(overrides)
    return RunComfySettings(**values)


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test in this file also proves that nothing it logged contains the token."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert SENTINEL not in record.getMessage()
        assert SENTINEL not in repr(record.args)
        if record.exc_info:
            assert SENTINEL not in "".join(traceback.format_exception(*record.exc_info))


def assert_no_leak(exc: BaseException) -> None:
    """Neither the exception's text, repr, traceback nor attributes reveal the token or request."""
    assert SENTINEL not in str(exc)
    assert SENTINEL not in repr(exc)
    assert SENTINEL not in "".join(traceback.format_exception(exc))
    assert exc.__cause__ is None
    assert not any(isinstance(v, httpx.Request | httpx.Response) for v in vars(exc).values())
    assert SENTINEL not in repr(vars(exc))  # upstream_message included


def call_raising(expected: type[UpstreamError], call: Callable[[], object]) -> UpstreamError:
    """Run ``call``, require ``expected`` (exactly that class), check it leaks nothing."""
    with pytest.raises(expected) as info:
        call()
    assert type(info.value) is expected
    assert_no_leak(info.value)
    return info.value


def client_for(handler: Handler, **overrides: Any) -> RunComfyClient:
    """A client whose every request goes to ``handler``."""
    return RunComfyClient(make_settings(**overrides), transport=httpx.MockTransport(handler))


def answer(body: Any, status: int = 200, **headers: str) -> Handler:
    """A handler that answers every request with ``body`` as JSON."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return handler


def answer_text(text: str, status: int = 200, **headers: str) -> Handler:
    """A handler that answers every request with raw ``text``."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=text, headers=headers)

    return handler


INPUT = GenerationInput.model_validate(
    {"prompt": "a red fox", "size": "2560x1440", "scale": 0.7, "force_single": True}
)

CALLS: dict[str, Callable[[RunComfyClient], object]] = {
    "submit": lambda c: c.submit(INPUT),
    "status": lambda c: c.status("req-1"),
    "result": lambda c: c.result("req-1"),
    "cancel": lambda c: c.cancel("req-1"),
}


# --- the requests themselves -------------------------------------------------------------


def test_submit_sends_the_documented_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "request_id": "req-1",
                "status_url": f"{BASE}/v1/requests/req-1/status",
                "result_url": f"{BASE}/v1/requests/req-1/result",
                "cancel_url": f"{BASE}/v1/requests/req-1/cancel",
            },
        )

    with client_for(handler) as client:
        got = client.submit(INPUT)

    assert got == SubmitResponse(
        request_id="req-1",
        status_url=f"{BASE}/v1/requests/req-1/status",
        result_url=f"{BASE}/v1/requests/req-1/result",
        cancel_url=f"{BASE}/v1/requests/req-1/cancel",
    )
    (request,) = seen
    assert request.method == "POST"
    assert request.url.host == "upstream.test"
    assert request.url.path == MODEL_PATH
    assert request.headers["Authorization"] == f"Bearer {SENTINEL}"
    assert request.headers["User-Agent"] == f"runcomfy-worker/{__version__}"
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.content)
    assert body == {
        "prompt": "a red fox",
        "width×height": "2560x1440(16:9)",
        "scale": 0.7,
        "force_single": True,
    }
    assert SIZE_KEY in body
    assert "size" not in body
    # Every phase of the request has an explicit limit from the settings.
    assert request.extensions["timeout"] == {"connect": 2.5, "read": 7.0, "write": 7.0, "pool": 2.5}


@pytest.mark.parametrize(
    ("name", "method", "suffix", "body", "expected"),
    [
        (
            "status",
            "GET",
            "/status",
            {"status": "in_queue", "queue_position": 3},
            StatusResponse(status="in_queue", queue_position=3),
        ),
        (
            "result",
            "GET",
            "/result",
            {"status": "completed", "output": {"image": "https://cdn.test/a.png"}},
            ResultResponse.model_validate(
                {"status": "completed", "output": {"image": "https://cdn.test/a.png"}}
            ),
        ),
        (
            "cancel",
            "POST",
            "/cancel",
            {"status": "cancelled", "request_id": "a/b c?d"},
            CancelResponse(status="cancelled", request_id="a/b c?d"),
        ),
    ],
)
def test_request_endpoints_quote_the_request_id(
    name: str, method: str, suffix: str, body: dict[str, Any], expected: object
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=body)

    with client_for(handler) as client:
        got = getattr(client, name)("a/b c?d")

    assert got == expected
    (request,) = seen
    assert request.method == method
    assert request.url.raw_path == b"/v1/requests/a%2Fb%20c%3Fd" + suffix.encode()
    assert request.headers["Authorization"] == f"Bearer {SENTINEL}"
    assert request.content == b""


def test_base_url_path_prefix_is_kept() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"status": "in_progress"})

    with client_for(handler, base_url="https://proxy.test/runcomfy/") as client:
        client.status("r1")
    assert seen == ["/runcomfy/v1/requests/r1/status"]


@pytest.mark.parametrize("request_id", ["", ".", ".."])
@pytest.mark.parametrize("name", ["status", "result", "cancel"])
def test_request_ids_that_would_change_the_path_are_refused(name: str, request_id: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request must be sent")

    with client_for(handler) as client:
        call_raising(UpstreamProtocolError, lambda: getattr(client, name)(request_id))


def test_no_token_configured_sends_no_authorization() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"message": "missing token"})

    with client_for(handler, api_token=None) as client:
        err = call_raising(UpstreamAccountError, lambda: client.status("r"))
    assert "Authorization" not in seen[0].headers
    assert "missing token" in str(err)


def test_redirects_are_not_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "https://elsewhere.test/steal"})

    with client_for(handler) as client:
        err = call_raising(UpstreamProtocolError, lambda: client.status("r"))
    assert seen == [f"{BASE}/v1/requests/r/status"]
    assert "302" in str(err)


def test_closed_client_refuses_to_send() -> None:
    client = client_for(answer({"status": "in_queue"}))
    with client:
        client.status("r")
    with pytest.raises(RuntimeError):
        client.status("r")
    client.close()  # closing twice is harmless


# --- status-code classification ----------------------------------------------------------

PERMANENT = [400, 404, 405, 410, 413, 415, 418, 422]
ACCOUNT_HTTP = [401, 403]
RETRYABLE = [408, 429, 500, 502, 503, 504, 599]


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("code", PERMANENT + ACCOUNT_HTTP)
def test_4xx_is_permanent_with_upstream_message(name: str, code: int) -> None:
    body = {"error": {"message": f"nope-{code}"}}
    expected = UpstreamAccountError if code in ACCOUNT_HTTP else PermanentUpstreamError
    with client_for(answer(body, code)) as client:
        err = call_raising(expected, lambda: CALLS[name](client))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == code
    assert err.error_code is None
    assert err.upstream_message == f"nope-{code}"
    assert f"nope-{code}" in str(err)
    assert str(code) in str(err)


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("code", RETRYABLE)
def test_408_429_5xx_are_retryable(name: str, code: int) -> None:
    with client_for(answer_text("busy", code)) as client:
        err = call_raising(RetryableUpstreamError, lambda: CALLS[name](client))
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code == code
    assert err.retry_after_s is None


@pytest.mark.parametrize(
    ("code", "retry_after", "expected"),
    [
        (429, "7", 7.0),
        (429, "0", 0.0),
        (503, "120", 120.0),
        (429, "soon", None),
        (500, "-3", None),
    ],
)
def test_retry_after_seconds(code: int, retry_after: str, expected: float | None) -> None:
    handler = answer({"message": "slow down"}, code, **{"Retry-After": retry_after})
    with client_for(handler) as client:
        err = call_raising(RetryableUpstreamError, lambda: client.status("r"))
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code == code
    assert err.retry_after_s == expected


def test_retry_after_http_date() -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=90)
    date = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    handler = answer({"message": "slow down"}, 429, **{"Retry-After": date})
    with client_for(handler) as client:
        err = call_raising(RetryableUpstreamError, lambda: client.submit(INPUT))
    assert isinstance(err, RetryableUpstreamError)
    assert err.retry_after_s is not None
    assert 80 <= err.retry_after_s <= 90


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (409, {"message": "request is in progress"}, NotCancellableError),
        (409, {}, NotCancellableError),
        (
            400,
            {"error": {"message": "Request is IN_PROGRESS and cannot be cancelled"}},
            NotCancellableError,
        ),
        (400, {"detail": "request not in queue"}, NotCancellableError),
        (400, {"message": "already completed"}, NotCancellableError),
        (400, {"message": "malformed request id"}, PermanentUpstreamError),
        (404, {"message": "unknown request, not in queue"}, PermanentUpstreamError),
        (422, {"message": "in progress"}, PermanentUpstreamError),
        (429, {"message": "in progress"}, RetryableUpstreamError),
    ],
)
def test_cancel_refusals(code: int, body: dict[str, Any], expected: type[UpstreamError]) -> None:
    with client_for(answer(body, code)) as client:
        err = call_raising(expected, lambda: client.cancel("r"))
    assert getattr(err, "status_code", None) == code


@pytest.mark.parametrize("name", ["submit", "status", "result"])
def test_409_outside_cancel_is_plain_permanent(name: str) -> None:
    with client_for(answer({"message": "conflict"}, 409)) as client:
        err = call_raising(PermanentUpstreamError, lambda: CALLS[name](client))
    assert isinstance(err, PermanentUpstreamError)
    assert err.status_code == 409


def test_cancel_acknowledged_with_an_empty_body() -> None:
    with client_for(lambda request: httpx.Response(204)) as client:
        assert client.cancel("r") == CancelResponse()


# --- classify_response: pure ---------------------------------------------------------------


def response(
    code: int, *, body: Any = None, text: str | None = None, **headers: str
) -> httpx.Response:
    """A bare response, as classify_response sees it."""
    if text is not None:
        return httpx.Response(code, text=text, headers=headers)
    if body is not None:
        return httpx.Response(code, json=body, headers=headers)
    return httpx.Response(code, headers=headers)


@pytest.mark.parametrize("code", [200, 201, 202, 204, 299])
def test_classify_2xx_passes(code: int) -> None:
    classify_response(response(code))  # no exception


@pytest.mark.parametrize(
    ("resp", "message"),
    [
        (response(400, body={"error": {"message": "prompt too long"}}), "prompt too long"),
        (response(400, body={"error": {"detail": "bad scale"}}), "bad scale"),
        (response(400, body={"error": "flat error"}), "flat error"),
        (response(400, body={"message": "top message"}), "top message"),
        (response(400, body={"detail": "fastapi detail"}), "fastapi detail"),
        (
            response(422, body={"detail": [{"loc": ["body", "scale"], "msg": "<= 1"}]}),
            '"scale"',
        ),
        (response(403, text="plain text refusal"), "plain text refusal"),
        (response(404, body=["odd", "array"]), '["odd","array"]'),
        (response(401), "Unauthorized"),
        (response(400, text="{broken"), "{broken"),
    ],
)
def test_classify_extracts_upstream_message(resp: httpx.Response, message: str) -> None:
    with pytest.raises(PermanentUpstreamError) as info:
        classify_response(resp)
    assert message in str(info.value)
    assert info.value.status_code == resp.status_code


def test_classify_truncates_long_messages() -> None:
    with pytest.raises(PermanentUpstreamError) as info:
        classify_response(response(400, body={"message": "x" * 10_000}))
    assert 400 < len(str(info.value)) < 600


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (400, PermanentUpstreamError),
        (401, UpstreamAccountError),
        (403, UpstreamAccountError),
        (404, PermanentUpstreamError),
        (408, RetryableUpstreamError),
        (409, PermanentUpstreamError),
        (422, PermanentUpstreamError),
        (429, RetryableUpstreamError),
        (500, RetryableUpstreamError),
        (502, RetryableUpstreamError),
        (503, RetryableUpstreamError),
        (504, RetryableUpstreamError),
        (101, UpstreamProtocolError),
        (301, UpstreamProtocolError),
        (304, UpstreamProtocolError),
        (307, UpstreamProtocolError),
    ],
)
def test_classify_table(code: int, expected: type[UpstreamError]) -> None:
    with pytest.raises(expected) as info:
        classify_response(response(code))
    assert type(info.value) is expected


def test_classify_cancel_flag() -> None:
    with pytest.raises(NotCancellableError):
        classify_response(response(409), cancel=True)
    with pytest.raises(PermanentUpstreamError) as info:
        classify_response(response(409))
    assert type(info.value) is PermanentUpstreamError


def test_classify_retry_after_on_503() -> None:
    with pytest.raises(RetryableUpstreamError) as info:
        classify_response(response(503, **{"Retry-After": "30"}))
    assert info.value.retry_after_s == 30.0
    assert info.value.status_code == 503


# --- transport failures --------------------------------------------------------------------


#: Failures before the request was completely sent: upstream cannot have accepted it.
NOT_SENT = [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ConnectTimeout("timed out"),
    httpx.WriteTimeout("timed out"),
    httpx.PoolTimeout("timed out"),
    httpx.WriteError("broken pipe"),
    httpx.ProxyError("proxy down"),
    httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'"),
    httpx.LocalProtocolError("Illegal header value"),
]
#: Failures after the request was sent, before an answer was read.
AFTER_SENDING = [
    httpx.ReadTimeout("timed out"),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.CloseError("close failed"),
]


@pytest.mark.parametrize("exc", NOT_SENT + AFTER_SENDING, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("name", list(CALLS))
def test_transport_errors_are_retryable(name: str, exc: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    # The submit POST is paid: a failure after sending is ambiguous (tested below).
    expected = (
        AmbiguousSubmitError
        if name == "submit" and any(exc is e for e in AFTER_SENDING)
        else RetryableUpstreamError
    )
    with client_for(handler) as client:
        err = call_raising(expected, lambda: CALLS[name](client))
    assert isinstance(err, RetryableUpstreamError)
    assert err.status_code is None
    assert err.retry_after_s is None
    assert type(exc).__name__ in str(err)
    if isinstance(exc, httpx.TimeoutException):
        assert "timed out" in str(err)


def test_read_timeout_on_submit_is_ambiguous() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with client_for(handler) as client:
        err = call_raising(AmbiguousSubmitError, lambda: client.submit(INPUT))
    assert isinstance(err, RetryableUpstreamError)  # still a retryable error for old callers
    assert err.status_code is None
    assert err.retry_after_s is None
    assert "may have accepted" in str(err)
    assert "ReadTimeout" in str(err)


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectTimeout("timed out"), httpx.ConnectError("[Errno 111] Connection refused")],
    ids=lambda e: type(e).__name__,
)
def test_nothing_sent_on_submit_is_plainly_retryable(exc: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with client_for(handler) as client:
        err = call_raising(RetryableUpstreamError, lambda: client.submit(INPUT))
    assert "may have accepted" not in str(err)


@pytest.mark.parametrize("name", ["status", "result", "cancel"])
def test_read_timeout_on_idempotent_calls_is_plainly_retryable(name: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with client_for(handler) as client:
        err = call_raising(RetryableUpstreamError, lambda: CALLS[name](client))
    assert "timed out" in str(err)


def _silent_server() -> tuple[socket.socket, threading.Event]:
    """A TCP server that reads a request and never answers (until ``done`` is set)."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            done.wait(5)

    threading.Thread(target=serve, daemon=True).start()
    return server, done


def test_real_read_timeout_on_submit_is_ambiguous() -> None:
    server, done = _silent_server()
    host, port = server.getsockname()
    try:
        settings = make_settings(base_url=f"http://{host}:{port}", read_timeout_s=0.2)
        with RunComfyClient(settings) as client:
            err = call_raising(AmbiguousSubmitError, lambda: client.submit(INPUT))
    finally:
        done.set()
        server.close()
    assert "ReadTimeout" in str(err)


def test_real_connection_refused_on_submit_is_plainly_retryable() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    host, port = probe.getsockname()
    probe.close()  # nothing listens there any more
    settings = make_settings(base_url=f"http://{host}:{port}", connect_timeout_s=1.0)
    with RunComfyClient(settings) as client:
        err = call_raising(RetryableUpstreamError, lambda: client.submit(INPUT))
    assert "ConnectError" in str(err)


# --- RunComfy error codes in the body -------------------------------------------------------


def error_body(code: Any, message: str = "upstream says no") -> dict[str, Any]:
    """RunComfy's error shape: a top-level error_code and error_message."""
    return {"error_code": code, "error_message": message}


#: (error_code as sent, class, status_code, error_code as kept) for an HTTP 200 answer.
CODES_ON_200: list[tuple[Any, type[UpstreamError], int | None, int | None]] = [
    (400002, UpstreamAccountError, 400, 400002),
    (400004, UpstreamAccountError, 400, 400004),
    (403001, UpstreamAccountError, 403, 403001),
    ("400002", UpstreamAccountError, 400, 400002),
    (404001, UpstreamExpiredError, 404, 404001),
    ("404001", UpstreamExpiredError, 404, 404001),
    (400001, PermanentUpstreamError, 400, 400001),
    (422001, PermanentUpstreamError, 422, 422001),
    (500001, RetryableUpstreamError, 500, 500001),
    (" 503000 ", RetryableUpstreamError, 503, 503000),
    (42, UpstreamProtocolError, None, 42),
    (0, UpstreamProtocolError, None, 0),
    (-400002, UpstreamProtocolError, None, -400002),
    (300001, UpstreamProtocolError, None, 300001),
    ("E_BALANCE", UpstreamProtocolError, None, None),
    (True, UpstreamProtocolError, None, None),
    ({"code": 1}, UpstreamProtocolError, None, None),
]


@pytest.mark.parametrize(
    ("code", "expected", "status_code", "kept"),
    CODES_ON_200,
    ids=[repr(c[0]) for c in CODES_ON_200],
)
@pytest.mark.parametrize("name", list(CALLS))
def test_error_code_on_200(
    name: str,
    code: Any,
    expected: type[UpstreamError],
    status_code: int | None,
    kept: int | None,
) -> None:
    message = f"upstream says no to {name}"
    with client_for(answer(error_body(code, message))) as client:
        err = call_raising(expected, lambda: CALLS[name](client))
    assert err.error_code == kept
    assert err.upstream_message == message
    assert message in str(err)
    assert getattr(err, "status_code", None) == status_code
    if isinstance(err, RetryableUpstreamError):
        assert err.retry_after_s is None


def test_error_code_on_200_keeps_retry_after() -> None:
    handler = answer(error_body(503001, "overloaded"), 200, **{"Retry-After": "9"})
    with client_for(handler) as client:
        err = call_raising(RetryableUpstreamError, lambda: client.status("r"))
    assert isinstance(err, RetryableUpstreamError)
    assert err.retry_after_s == 9.0
    assert err.error_code == 503001


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("request is in progress and cannot be cancelled", NotCancellableError),
        ("invalid resource identifier", PermanentUpstreamError),
    ],
)
def test_cancel_refused_with_an_error_code_on_200(
    message: str, expected: type[UpstreamError]
) -> None:
    with client_for(answer(error_body(400003, message))) as client:
        err = call_raising(expected, lambda: client.cancel("r"))
    assert err.error_code == 400003
    assert getattr(err, "status_code", None) == 400


@pytest.mark.parametrize(
    ("http", "code", "expected", "status_code"),
    [
        (404, 404001, UpstreamExpiredError, 404),
        (400, 404001, UpstreamExpiredError, 404),
        (400, 400002, UpstreamAccountError, 400),
        (402, 400002, UpstreamAccountError, 402),
        (403, 403001, UpstreamAccountError, 403),
        (401, "400004", UpstreamAccountError, 401),
        (500, 400002, UpstreamAccountError, 500),
        (429, 400002, UpstreamAccountError, 429),
        # other codes: the HTTP status decides, the code is kept
        (400, 400001, PermanentUpstreamError, 400),
        (403, 400001, PermanentUpstreamError, 403),  # names a request's fault, not the account
        (401, 400001, PermanentUpstreamError, 401),
        (422, 422001, PermanentUpstreamError, 422),
        (404, 500001, PermanentUpstreamError, 404),
        (502, 500001, RetryableUpstreamError, 502),
        (503, 400001, RetryableUpstreamError, 503),
    ],
)
@pytest.mark.parametrize("name", list(CALLS))
def test_error_code_on_4xx_5xx(
    name: str, http: int, code: Any, expected: type[UpstreamError], status_code: int
) -> None:
    with client_for(answer(error_body(code, "said upstream"), http)) as client:
        err = call_raising(expected, lambda: CALLS[name](client))
    assert err.error_code == int(code)
    assert err.upstream_message == "said upstream"
    assert getattr(err, "status_code", None) == status_code
    assert str(http) in str(err)


@pytest.mark.parametrize("http", [401, 403])
def test_401_403_with_an_unreadable_code_are_account_errors(http: int) -> None:
    with client_for(answer(error_body("E_TOKEN", "bad token"), http)) as client:
        err = call_raising(UpstreamAccountError, lambda: client.submit(INPUT))
    assert err.error_code is None


def test_409_with_an_error_code_on_cancel_is_not_cancellable() -> None:
    with client_for(answer(error_body(409001, "running"), 409)) as client:
        err = call_raising(NotCancellableError, lambda: client.cancel("r"))
    assert err.error_code == 409001


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("submit", {"request_id": "r", "error_code": 400002, "error_message": "low balance"}),
        ("status", {"status": "in_queue", "error_code": 0}),
        ("status", {"status": "failed", "error_code": 500001, "error_message": "boom"}),
        (
            "result",
            {"status": "completed", "output": {"image": "https://cdn.test/a.png"}, "error_code": 0},
        ),
        ("result", {"output": {"image": "https://cdn.test/a.png"}, "error_code": 400001}),
        ("cancel", {"status": "cancelled", "error_code": 0}),
        ("status", {"status": "in_queue", "error_code": None}),
        ("submit", {"request_id": "r", "error_code": ""}),
    ],
)
def test_documented_success_shape_wins_over_an_error_code(name: str, body: dict[str, Any]) -> None:
    with client_for(answer(body)) as client:
        got = CALLS[name](client)
    assert got is not None


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("submit", {"request_id": "", "error_code": 400002}, UpstreamAccountError),
        ("submit", {"request_id": None, "error_code": 404001}, UpstreamExpiredError),
        ("status", {"status": "error", "error_code": 400004}, UpstreamAccountError),
        ("status", {"status": None, "error_code": 404001}, UpstreamExpiredError),
        ("result", {"output": None, "error_code": 404001}, UpstreamExpiredError),
        ("cancel", {"request_id": "r", "error_code": 404001}, UpstreamExpiredError),
    ],
)
def test_error_code_without_the_success_shape_is_an_error(
    name: str, body: dict[str, Any], expected: type[UpstreamError]
) -> None:
    with client_for(answer(body)) as client:
        call_raising(expected, lambda: CALLS[name](client))


@pytest.mark.parametrize("http", [200, 400, 403, 404])
@pytest.mark.parametrize("code", [400002, 404001, 400001, 500001, "weird"])
@pytest.mark.parametrize("name", list(CALLS))
def test_error_code_messages_never_carry_the_token(name: str, code: Any, http: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["Authorization"]
        body = error_body(code, f"token {auth} rejected; {SENTINEL}")
        return httpx.Response(http, json=body)

    with client_for(handler) as client, pytest.raises(UpstreamError) as info:
        CALLS[name](client)
    assert_no_leak(info.value)
    assert info.value.upstream_message is not None
    assert SENTINEL not in info.value.upstream_message
    assert "Bearer ***" in info.value.upstream_message


def test_classify_error_code_on_200() -> None:
    with pytest.raises(UpstreamAccountError) as info:
        classify_response(response(200, body=error_body(400002, "top up")))
    assert info.value.error_code == 400002
    assert info.value.upstream_message == "top up"
    with pytest.raises(UpstreamExpiredError):
        classify_response(response(200, body=error_body(404001)), answer=StatusResponse)
    # the documented answer passes, even with a code; without an error_code nothing is checked
    body = {"request_id": "r", **error_body(400002)}
    classify_response(response(200, body=body), answer=SubmitResponse)
    classify_response(response(200, body={"anything": 1}), answer=SubmitResponse)


def test_undecodable_content_encoding_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=b"definitely not gzip", headers={"Content-Encoding": "gzip"}
        )

    with client_for(handler) as client:
        call_raising(UpstreamProtocolError, lambda: client.status("r"))


# --- answer shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize(
    "text", ["{not json", "<html>502 Bad Gateway</html>", "[1, 2", '{"status": "in_queue"']
)
def test_malformed_json_is_a_protocol_error(name: str, text: str) -> None:
    with client_for(answer_text(text)) as client:
        err = call_raising(UpstreamProtocolError, lambda: CALLS[name](client))
    assert "not JSON" in str(err)


@pytest.mark.parametrize("name", ["submit", "status", "result"])
def test_empty_200_is_a_protocol_error(name: str) -> None:
    with client_for(answer_text("")) as client:
        call_raising(UpstreamProtocolError, lambda: CALLS[name](client))


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("body", [[{"status": "in_queue"}], "completed", 42, None, True])
def test_non_object_json_is_a_protocol_error(name: str, body: Any) -> None:
    with client_for(answer_text(json.dumps(body))) as client:
        err = call_raising(UpstreamProtocolError, lambda: CALLS[name](client))
    assert "expected an object" in str(err)


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("status", {"status": "exploded"}, "status"),
        ("status", {"status": None}, "status"),
        ("status", {}, "status"),
        ("status", {"status": "in_queue", "queue_position": "first"}, "queue_position"),
        ("result", {"status": "done"}, "status"),
        ("result", {"status": "completed", "output": {"images": "https://x.test/a"}}, "images"),
        ("result", {"status": "completed", "output": ["https://x.test/a"]}, "output"),
        ("submit", {}, "request_id"),
        ("submit", {"status_url": "https://x.test/s"}, "request_id"),
        ("submit", {"request_id": ""}, "request_id"),
        ("submit", {"request_id": 12345}, "request_id"),
    ],
)
def test_unknown_shapes_are_protocol_errors(name: str, body: dict[str, Any], field: str) -> None:
    with client_for(answer(body)) as client:
        err = call_raising(UpstreamProtocolError, lambda: CALLS[name](client))
    assert field in str(err)


def test_submit_with_an_unusable_request_id_is_a_protocol_error() -> None:
    with client_for(answer({"request_id": ".."})) as client:
        call_raising(UpstreamProtocolError, lambda: client.submit(INPUT))


@pytest.mark.parametrize("status", ["in_queue", "in_progress", "completed", "cancelled", "failed"])
def test_every_known_status_parses(status: str) -> None:
    with client_for(answer({"status": status, "request_id": "r"})) as client:
        assert client.status("r").status == status


def test_extra_fields_are_tolerated() -> None:
    body = {
        "status": "in_queue",
        "queue_position": 2,
        "request_id": "r",
        "eta_s": 12.5,
        "new_thing": {"nested": [1, 2, 3]},
    }
    with client_for(answer(body)) as client:
        got = client.status("r")
        submitted = client_for(
            answer({"request_id": "r", "created_at": "2025-01-01T00:00:00Z", "model": "m"})
        ).submit(INPUT)
    assert got.queue_position == 2
    assert got.model_extra == {"eta_s": 12.5, "new_thing": {"nested": [1, 2, 3]}}
    assert submitted.request_id == "r"
    assert submitted.model_extra == {"created_at": "2025-01-01T00:00:00Z", "model": "m"}


def test_failed_status_keeps_the_error() -> None:
    body = {"status": "failed", "error": {"message": "NSFW content detected"}}
    with client_for(answer(body)) as client:
        got = client.status("r")
    assert got.status == "failed"
    assert got.error == {"message": "NSFW content detected"}


A, B, C, D = (f"https://cdn.test/{n}" for n in ("a.png", "b.png", "c.mp4", "d.mp4"))


@pytest.mark.parametrize(
    ("output", "media"),
    [
        ({"image": A}, [("image", A)]),
        ({"images": [A, B]}, [("image", A), ("image", B)]),
        ({"video": C}, [("video", C)]),
        ({"videos": [C, D]}, [("video", C), ("video", D)]),
        (
            {"image": A, "images": [B], "video": C, "videos": [D], "seed": 7},
            [("image", A), ("image", B), ("video", C), ("video", D)],
        ),
        ({"images": []}, []),
        ({}, []),
    ],
    ids=["image", "images", "video", "videos", "mixed", "empty-list", "empty"],
)
def test_result_output_shapes(output: dict[str, Any], media: list[tuple[str, str]]) -> None:
    body = {"status": "completed", "request_id": "r", "output": output, "duration_ms": 900}
    with client_for(answer(body)) as client:
        got = client.result("r")
    assert got.status == "completed"
    assert got.output is not None
    assert got.output.media() == media


@pytest.mark.parametrize("status", ["in_queue", "in_progress"])
def test_result_before_completion_returns_the_state(status: str) -> None:
    with client_for(answer({"status": status, "queue_position": 0})) as client:
        got = client.result("r")
    assert got.status == status
    assert got.output is None


# --- the token never leaks -----------------------------------------------------------------


def test_repr_does_not_contain_the_token() -> None:
    with client_for(answer({})) as client:
        assert SENTINEL not in repr(client)
        assert SENTINEL not in str(client)
        assert "upstream.test" in repr(client)
        assert SENTINEL not in repr(vars(client))


def echo_authorization(code: int) -> Handler:
    """A misbehaving server that repeats the Authorization header back in its answer."""

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["Authorization"]
        return httpx.Response(code, text=f"you sent {auth!r}; headers={dict(request.headers)}")

    return handler


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (200, UpstreamProtocolError),
        (401, UpstreamAccountError),
        (409, PermanentUpstreamError),
        (429, RetryableUpstreamError),
        (500, RetryableUpstreamError),
    ],
)
@pytest.mark.parametrize("name", list(CALLS))
def test_echoed_token_is_redacted(name: str, code: int, expected: type[UpstreamError]) -> None:
    if name == "cancel" and code == 409:
        expected = NotCancellableError
    with client_for(echo_authorization(code)) as client:
        err = call_raising(expected, lambda: CALLS[name](client))
    assert "Bearer ***" in str(err)


def test_no_error_or_log_line_carries_the_token(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[Handler] = [
        answer({"request_id": "r"}),
        answer({"message": "bad"}, 400),
        answer({"message": "bad"}, 401),
        answer({}, 429, **{"Retry-After": "3"}),
        answer_text("{oops"),
    ]

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    outcomes.append(boom)
    raised: list[BaseException] = []
    for handler in outcomes:
        with client_for(handler) as client:
            for call in CALLS.values():
                try:
                    call(client)
                except UpstreamError as exc:
                    raised.append(exc)
    assert len(raised) >= 20
    for error in raised:
        assert_no_leak(error)
    assert caplog.records  # the autouse fixture checks every one of them


def test_one_debug_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/result"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "in_progress", "request_id": "r1"})

    with client_for(handler) as client:
        client.submit(INPUT)
        client.status("r1")
        with pytest.raises(RetryableUpstreamError):
            client.result("r1")

    lines = [r for r in caplog.records if r.name == "worker.services.runcomfy"]
    assert [r.levelno for r in lines] == [logging.DEBUG] * 3
    messages = [r.getMessage() for r in lines]
    assert messages[0].startswith(f"runcomfy POST {MODEL_PATH} -> 200 in ")
    assert messages[1].startswith("runcomfy GET /v1/requests/r1/status -> 200 in ")
    assert messages[2].startswith("runcomfy GET /v1/requests/r1/result failed (ConnectError) in ")
    assert all(m.endswith(" ms") for m in messages)
    assert not any("authorization" in m.lower() or "bearer" in m.lower() for m in messages)


# --- parse_retry_after ---------------------------------------------------------------------

NOW = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("-5", None),
        ("+5", None),
        ("5s", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("1_000", None),
        ("٣", None),  # an Arabic-Indic digit is not delay-seconds
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 60.0),  # RFC 850
        ("Wed Oct 21 07:28:00 2015", 60.0),  # asctime
        ("Wed, 21 Oct 2015 07:28:00 -0000", 60.0),
        ("Wed, 21 Oct 2015 09:28:00 +0200", 60.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past: never negative
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ("2015-10-21T07:28:00Z", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_naive_now_is_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:30 GMT", now=naive) == 30.0


def test_parse_retry_after_defaults_to_the_clock() -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=100)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    got = parse_retry_after(soon)
    assert got is not None
    assert 90 <= got <= 100
