"""The RunComfy Model API client (submit, status, result, cancel); upstream errors classified here.

Every call raises only :class:`~worker.errors.UpstreamError` and its subclasses, classified
here from the HTTP status, the transport error or the body, as drawn in :mod:`worker.errors`.

The API token is revealed only by :class:`_BearerAuth` (on each outgoing request) and by the
redaction of upstream messages that echo it. It is never logged, never part of a repr and never
part of an exception's text: httpx exceptions, which hold the request and its headers, are
not chained into ours.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Generator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from api_contracts.inputs import GenerationInput
from api_contracts.upstream import CancelResponse, ResultResponse, StatusResponse, SubmitResponse
from worker import __version__
from worker.errors import (
    NotCancellableError,
    PermanentUpstreamError,
    RetryableUpstreamError,
    UpstreamError,
    UpstreamProtocolError,
)
from worker.settings import RunComfySettings

__all__ = ["RunComfyClient", "classify_response", "parse_retry_after"]

log = logging.getLogger(__name__)

USER_AGENT: Final = f"runcomfy-worker/{__version__}"
#: Upstream messages are copied into job records and webhooks; keep them bounded.
MAX_MESSAGE_CHARS: Final = 500
_REDACTED: Final = "***"
_RETRYABLE_4XX: Final = frozenset({408, 429})
# A cancel refused with a 400 rather than a 409 is recognised by its wording.
_NOT_CANCELLABLE_WORDS: Final = re.compile(
    r"in[ _-]?progress|running|not (?:in (?:the )?)?queued?|already|cannot be cancel",
    re.IGNORECASE,
)
_DELAY_SECONDS: Final = re.compile(r"\d+(?:\.\d+)?", re.ASCII)

_Answer = TypeVar("_Answer", bound=BaseModel)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (delay-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is always GMT; a zone-less date ("-0000") is read the same way.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    if current.tzinfo is None:
        current = current.replace(tzinfo=UTC)
    return max(0.0, (when - current).total_seconds())


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 1] + "…"


def _message_from_json(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        inner = error.get("message") or error.get("detail")
        if inner:
            return inner if isinstance(inner, str) else json.dumps(inner, ensure_ascii=False)
    for key in ("message", "detail", "error"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return value
        # FastAPI-style 422 details are a list of {loc, msg}; keep them, the field names matter.
        if isinstance(value, list | dict) and value:
            return json.dumps(value, ensure_ascii=False)
    return None


def _upstream_message(response: httpx.Response) -> str:
    """Upstream's words for an error: JSON ``error.message``/``message``/``detail``, or text."""
    try:
        text = response.text
    except (UnicodeDecodeError, LookupError, httpx.HTTPError):
        return "(undecodable body)"
    try:
        found = _message_from_json(json.loads(text)) if text.strip() else None
    except ValueError:
        found = None
    if found is None:
        found = text or response.reason_phrase or "(empty body)"
    return _truncate(found)


def _where(response: httpx.Response) -> str:
    try:
        request = response.request
    except RuntimeError:  # a bare Response built in a test has no request
        return "RunComfy"
    return f"RunComfy {request.method} {request.url.path}"


def classify_response(response: httpx.Response, *, cancel: bool = False) -> None:
    """Raise the matching UpstreamError for a non-2xx answer; return None for 2xx.

    ``cancel=True`` marks an answer to ``POST …/cancel``, where "not in the queue any more"
    (409, or a 400 saying the request is in progress) becomes NotCancellableError.
    """
    code = response.status_code
    if 200 <= code < 300:
        return
    where = _where(response)
    if 400 <= code < 500 and code not in _RETRYABLE_4XX:
        message = _upstream_message(response)
        text = f"{where} answered {code}: {message}"
        if cancel and (code == 409 or (code == 400 and _NOT_CANCELLABLE_WORDS.search(message))):
            raise NotCancellableError(text, status_code=code)
        raise PermanentUpstreamError(text, status_code=code)
    if code in _RETRYABLE_4XX or 500 <= code < 600:
        raise RetryableUpstreamError(
            f"{where} answered {code}: {_upstream_message(response)}",
            status_code=code,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
        )
    # 1xx leftovers, redirects (never followed: the token must not travel elsewhere), 6xx+.
    raise UpstreamProtocolError(f"{where} answered unexpected HTTP status {code}")


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{loc}: {err['msg']}")
    return _truncate("; ".join(parts))


def _parse_answer(
    response: httpx.Response, model: type[_Answer], *, empty_ok: bool = False
) -> _Answer:
    """Validate a 2xx body as ``model``; anything else is an UpstreamProtocolError."""
    where = _where(response)
    if empty_ok and not response.content.strip():
        return model.model_validate({})
    try:
        body = response.json()
    except ValueError:
        raise UpstreamProtocolError(
            f"{where} answered {response.status_code} with a body that is not JSON: "
            f"{_truncate(response.text)!r}"
        ) from None
    if not isinstance(body, dict):
        raise UpstreamProtocolError(
            f"{where} answered a JSON {type(body).__name__}, expected an object"
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise UpstreamProtocolError(
            f"{where} answered an unexpected {model.__name__}: {_validation_summary(exc)}"
        ) from None


def _request_path(request_id: str) -> str:
    # A dot segment would be resolved away by URL normalisation and hit another endpoint.
    if not request_id or request_id.strip(".") == "":
        raise UpstreamProtocolError(f"request id {request_id!r} cannot be used in a URL")
    return "/v1/requests/" + quote(request_id, safe="")


class _BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer …`` to each request; the only holder of the token."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Set the header on the outgoing request."""
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(token=***)"


class RunComfyClient:
    """One per worker process."""

    def __init__(
        self, settings: RunComfySettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._settings = settings
        token = settings.api_token
        self._token = token
        self._model_path = "/v1/models/" + quote(settings.model_id, safe="/")
        self._http = httpx.Client(
            base_url=settings.base_url,
            # Without a token upstream answers 401, which surfaces as a PermanentUpstreamError.
            auth=_BearerAuth(token) if token is not None else None,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.read_timeout_s,
                pool=settings.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0
            ),
            # A redirect would carry the token to another host; treat it as a protocol error.
            follow_redirects=False,
            transport=transport,
        )

    def __repr__(self) -> str:
        return (
            f"RunComfyClient(base_url={self._settings.base_url!r}, "
            f"model_id={self._settings.model_id!r})"
        )

    def submit(self, inp: GenerationInput) -> SubmitResponse:
        """Queue one generation; returns upstream's request id and URLs."""
        answer = self._call("POST", self._model_path, SubmitResponse, json_body=inp.to_upstream())
        _request_path(answer.request_id)  # an id unusable in later URLs is a protocol error now
        return answer

    def status(self, request_id: str) -> StatusResponse:
        """Current state of a request: in_queue, in_progress, completed, cancelled or failed."""
        return self._call("GET", _request_path(request_id) + "/status", StatusResponse)

    def result(self, request_id: str) -> ResultResponse:
        """Outputs of a completed request, or its current state when not completed."""
        return self._call("GET", _request_path(request_id) + "/result", ResultResponse)

    def cancel(self, request_id: str) -> CancelResponse:
        """Cancel a queued request; NotCancellableError once it is running."""
        return self._call(
            "POST", _request_path(request_id) + "/cancel", CancelResponse, cancel=True
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        model: type[_Answer],
        *,
        json_body: dict[str, Any] | None = None,
        cancel: bool = False,
    ) -> _Answer:
        try:
            response = self._send(method, path, json_body)
            classify_response(response, cancel=cancel)
            # Cancel may be acknowledged with an empty 202/204; its body is never needed.
            return _parse_answer(response, model, empty_ok=cancel)
        except UpstreamError as exc:
            exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
            raise

    def _send(self, method: str, path: str, json_body: dict[str, Any] | None) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = self._http.request(method, path, json=json_body)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            ms = (time.perf_counter() - started) * 1000
            name = type(exc).__name__
            log.debug("runcomfy %s %s failed (%s) in %.0f ms", method, path, name, ms)
            # `from None`: httpx exceptions hold the Request, and with it the Authorization header.
            if isinstance(exc, httpx.DecodingError):
                raise UpstreamProtocolError(
                    f"RunComfy {method} {path}: undecodable body: {name}: {exc}"
                ) from None
            kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
            raise RetryableUpstreamError(
                f"RunComfy {method} {path} {kind}: {name}: {exc}"
            ) from None
        ms = (time.perf_counter() - started) * 1000
        log.debug("runcomfy %s %s -> %d in %.0f ms", method, path, response.status_code, ms)
        return response

    def _redact(self, text: str) -> str:
        # Only a misbehaving server would echo the token back, but its message lands in logs.
        secret = self._token.get_secret_value() if self._token is not None else ""
        return text.replace(secret, _REDACTED) if secret else text
