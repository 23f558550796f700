"""The RunComfy Model API client (submit, status, result, cancel); upstream errors classified here.

Every call raises only :class:`~worker.errors.UpstreamError` and its subclasses, classified
here from the HTTP status, the transport error or the body, as drawn in :mod:`worker.errors`.

RunComfy error codes. Some RunComfy APIs signal errors with HTTP 200 and a top-level
``{"error_code": 400002, "error_message": "…"}`` body. Any answer, 2xx or not, whose JSON
object carries an ``error_code`` (an int or a numeric string) is classified by that code:

* 400002 (insufficient balance), 400004 (user account), 403001 (permission denied):
  :class:`~worker.errors.UpstreamAccountError`, whatever the HTTP status; so are HTTP 401 and
  403 that name no code (a bad or revoked token);
* 404001 (request id unknown, deleted or expired): :class:`~worker.errors.UpstreamExpiredError`;
* any other code on a 2xx: 4xxxxx → PermanentUpstreamError (NotCancellableError for a cancel
  whose message says the request runs), 5xxxxx → RetryableUpstreamError, anything else (or a
  code that is not a number) → UpstreamProtocolError;
* any other code on a 4xx/5xx: the HTTP status decides, as before; the code is kept.

A 2xx that has the endpoint's documented success shape (a submit's ``request_id``, a known
``status``, a result's ``output``, a cancel's ``status``) is the answer even if it also
carries an ``error_code``. Every UpstreamError keeps ``error_code`` and ``upstream_message``.

Transport failures. Status, result and cancel are idempotent: every transport failure is a
plain RetryableUpstreamError. The submit POST is paid, so it is split by when it failed:

* nothing complete reached upstream, so nothing can have been accepted: ``ConnectError``
  (refused, DNS), ``ConnectTimeout``, ``PoolTimeout``, ``ProxyError``,
  ``UnsupportedProtocol``, ``LocalProtocolError``, and ``WriteTimeout``/``WriteError``: the
  body was not completely written (httpcore's HTTP/1.1 connection swallows a ``WriteError``
  and goes on to read the answer, so one that does surface is from before the end of the
  body; a body cut short cannot be parsed, let alone accepted) → RetryableUpstreamError;
* the request was fully sent and no answer was read: ``ReadTimeout``, ``ReadError``
  (connection reset), ``RemoteProtocolError`` ("server disconnected without sending a
  response", which can also be a stale keep-alive connection: indistinguishable), and any
  transport error not listed above → :class:`~worker.errors.AmbiguousSubmitError`; upstream
  may have accepted, and billed, a request whose id we never saw.

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
from typing import Any, Final, Self, TypeVar, get_args
from urllib.parse import quote

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from api_contracts.inputs import GenerationInput
from api_contracts.upstream import (
    CancelResponse,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    UpstreamState,
)
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
#: RunComfy error codes that say the account cannot submit (docs "model-apis/error-codes"):
#: 400002 InsufficientResources (balance), 400004 UserAccountError, 403001 PermissionDenied.
ACCOUNT_ERROR_CODES: Final = frozenset({400002, 400004, 403001})
#: RunComfy's "request id does not exist, was deleted or expired".
EXPIRED_ERROR_CODE: Final = 404001
#: HTTP statuses that, with no error_code in the body, mean a bad token or no permission.
_ACCOUNT_HTTP: Final = frozenset({401, 403})
_NUMERIC_CODE: Final = re.compile(r"[0-9]{1,12}", re.ASCII)
_STATES: Final = frozenset(get_args(UpstreamState))
#: Transport failures after which upstream cannot hold a complete request (module docstring).
_NOT_SENT: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteTimeout,
    httpx.WriteError,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)

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
    for key in ("error_message", "message", "detail", "error"):
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


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a JSON object, or None (empty, not JSON, not an object, undecodable)."""
    try:
        text = response.text
        body = json.loads(text) if text.strip() else None
    except (ValueError, UnicodeDecodeError, LookupError, httpx.HTTPError):
        return None
    return body if isinstance(body, dict) else None


def _body_error_code(body: dict[str, Any] | None) -> tuple[bool, int | None]:
    """Whether ``body`` carries a top-level ``error_code`` at all, and its value if numeric."""
    raw = body.get("error_code") if body is not None else None
    if raw is None or raw == "":
        return False, None
    if isinstance(raw, bool):
        return True, None
    if isinstance(raw, int):
        return True, raw
    if isinstance(raw, float) and raw.is_integer():
        return True, int(raw)
    if isinstance(raw, str) and _NUMERIC_CODE.fullmatch(raw.strip()):
        return True, int(raw.strip())
    return True, None


def _has_answer_shape(body: dict[str, Any], answer: type[BaseModel]) -> bool:
    """Whether a 2xx body is ``answer``'s documented success shape (module docstring)."""
    if answer is SubmitResponse:
        request_id = body.get("request_id")
        return isinstance(request_id, str) and request_id != ""
    if answer is StatusResponse:
        return body.get("status") in _STATES
    if answer is ResultResponse:
        return body.get("status") in _STATES or isinstance(body.get("output"), dict)
    if answer is CancelResponse:
        status = body.get("status")
        return isinstance(status, str) and status != ""
    return False


def _code_family(error_code: int) -> int:
    """The HTTP status a six-digit RunComfy code names (400002 → 400); else 0."""
    return error_code // 1000 if 100_000 <= error_code < 1_000_000 else 0


def _raise_for_error_code(
    response: httpx.Response, body: dict[str, Any], *, cancel: bool, where: str
) -> None:
    """Raise what the body's error_code names; return when the HTTP status should decide."""
    has_code, error_code = _body_error_code(body)
    if not has_code:
        return
    code = response.status_code
    ok = 200 <= code < 300
    message = _upstream_message(response)
    text = f"{where} answered {code} with error_code {error_code}: {message}"
    if error_code in ACCOUNT_ERROR_CODES:
        raise UpstreamAccountError(
            text,
            status_code=_code_family(error_code) if ok else code,
            error_code=error_code,
            upstream_message=message,
        )
    if error_code == EXPIRED_ERROR_CODE:
        raise UpstreamExpiredError(text, error_code=error_code, upstream_message=message)
    if not ok:
        return  # a 4xx/5xx with another code: its HTTP status decides
    family = _code_family(error_code) if error_code is not None else 0
    if 400 <= family < 500:
        if cancel and _NOT_CANCELLABLE_WORDS.search(message):
            raise NotCancellableError(
                text, status_code=family, error_code=error_code, upstream_message=message
            )
        raise PermanentUpstreamError(
            text, status_code=family, error_code=error_code, upstream_message=message
        )
    if 500 <= family < 600:
        raise RetryableUpstreamError(
            text,
            status_code=family,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            error_code=error_code,
            upstream_message=message,
        )
    shown = _truncate(repr(body.get("error_code")))[:60]
    raise UpstreamProtocolError(
        f"{where} answered {code} with an unrecognised error_code {shown}: {message}",
        error_code=error_code,
        upstream_message=message,
    )


def classify_response(
    response: httpx.Response, *, cancel: bool = False, answer: type[BaseModel] | None = None
) -> None:
    """Raise the matching UpstreamError for an error answer; return None for a usable 2xx.

    An error answer is a non-2xx, or a 2xx whose JSON object carries an ``error_code`` and
    is not ``answer``'s documented success shape (with ``answer=None``, any 2xx with an
    ``error_code``); the module docstring lists what each code becomes. ``cancel=True`` marks
    an answer to ``POST …/cancel``, where "not in the queue any more" (409, or a 400 saying
    the request is in progress) becomes NotCancellableError.
    """
    code = response.status_code
    where = _where(response)
    error_code: int | None = None
    if 200 <= code < 300 or 400 <= code < 600:
        body = _json_object(response)
        if body is not None and not (
            200 <= code < 300 and answer is not None and _has_answer_shape(body, answer)
        ):
            _raise_for_error_code(response, body, cancel=cancel, where=where)
        _, error_code = _body_error_code(body)
    if 200 <= code < 300:
        return
    if 400 <= code < 500 and code not in _RETRYABLE_4XX:
        message = _upstream_message(response)
        text = f"{where} answered {code}: {message}"
        if cancel and (code == 409 or (code == 400 and _NOT_CANCELLABLE_WORDS.search(message))):
            raise NotCancellableError(
                text, status_code=code, error_code=error_code, upstream_message=message
            )
        if code in _ACCOUNT_HTTP and error_code is None:
            raise UpstreamAccountError(text, status_code=code, upstream_message=message)
        raise PermanentUpstreamError(
            text, status_code=code, error_code=error_code, upstream_message=message
        )
    if code in _RETRYABLE_4XX or 500 <= code < 600:
        message = _upstream_message(response)
        raise RetryableUpstreamError(
            f"{where} answered {code}: {message}",
            status_code=code,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            error_code=error_code,
            upstream_message=message,
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
        """Queue one generation; returns upstream's request id and URLs.

        A transport failure after the request was sent raises AmbiguousSubmitError: upstream
        may have accepted (and billed) it (module docstring)."""
        answer = self._call(
            "POST", self._model_path, SubmitResponse, json_body=inp.to_upstream(), paid=True
        )
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
        paid: bool = False,
    ) -> _Answer:
        try:
            response = self._send(method, path, json_body, paid=paid)
            classify_response(response, cancel=cancel, answer=model)
            # Cancel may be acknowledged with an empty 202/204; its body is never needed.
            return _parse_answer(response, model, empty_ok=cancel)
        except UpstreamError as exc:
            exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
            if exc.upstream_message is not None:
                exc.upstream_message = self._redact(exc.upstream_message)
            raise

    def _send(
        self, method: str, path: str, json_body: dict[str, Any] | None, *, paid: bool
    ) -> httpx.Response:
        """One request. ``paid``: a POST that may bill a generation, where a transport failure
        after the request was sent is ambiguous (module docstring)."""
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
            if paid and not isinstance(exc, _NOT_SENT):
                raise AmbiguousSubmitError(
                    f"RunComfy {method} {path} {kind} after the request was sent: {name}: "
                    f"{exc}; upstream may have accepted (and billed) it"
                ) from None
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
