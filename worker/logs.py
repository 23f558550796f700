"""Structured logs: one JSON object per line on stdout, with the job context attached.

``log_context(job_id=..., task=...)`` sets fields for everything logged inside it (a
``contextvars`` variable, so it follows the task, not the logger). ``SecretRedactingFilter``
masks configured secret values in the final text as a last line of defence: code should
never log secrets in the first place.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

REDACTED: Final = "***"

# Read-only default: contexts are replaced on entry, never mutated in place.
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "runcomfy_log_context", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskName"}

# Marks the handler this module installed, so configure_logging can replace it on a second call.
_HANDLER_MARK: Final = "_runcomfy_handler"


def current_context() -> dict[str, Any]:
    """The fields ``log_context`` has set for the code running now (a copy)."""
    return dict(_CONTEXT.get())


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (job_id, request_id, task, attempt …) to every record logged inside.

    Contexts nest: inner fields are added to (and override) outer ones; ``None`` values are
    left out so callers can pass optional ids unconditionally.
    """
    merged = {**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class ContextFilter(logging.Filter):
    """Copies the ``log_context`` fields onto each record (without overriding ``extra=``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the context; never drops a record."""
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context/extra fields, exc, stack."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Records that did not pass through ContextFilter (e.g. formatted directly) still
        # get the context of the code that formats them.
        for key, value in {**_CONTEXT.get(), **_extras(record)}.items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs, with the context fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The classic line plus ``[job_id=… task=…]`` when there is context."""
        line = super().format(record)
        fields = {**_CONTEXT.get(), **_extras(record)}
        if not fields:
            return line
        head, sep, tail = line.partition("\n")
        tags = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{head} [{tags}]{sep}{tail}"


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    """The non-empty secrets, once each, longest first (so a secret that contains another
    one is masked whole)."""
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty value of ``secrets`` replaced by ``***``."""
    return _redact_ordered(text, _longest_first(secrets))


def _redact_ordered(text: str, ordered: tuple[str, ...]) -> str:
    for secret in ordered:
        text = text.replace(secret, REDACTED)
    return text


class SecretRedactingFilter(logging.Filter):
    """Masks configured secret values in the message, exception text, stack and extras."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Ordered once here, not for every message and field of every record (a few % of
        # an INFO line's CPU).
        self.secrets: tuple[str, ...] = _longest_first(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = _redact_ordered(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Format now so the traceback text (which may quote a URL or header) is masked too;
            # Formatter.format reuses exc_text instead of formatting again.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact_ordered(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = _redact_ordered(record.stack_info, self.secrets)
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, _redact_ordered(value, self.secrets))
        return True


#: Celery's loggers that write a line for every task received and finished.
CELERY_PER_TASK_LOGGERS: Final = ("celery.app.trace", "celery.worker.strategy")
#: httpx writes an INFO line for every request ("HTTP Request: GET <url> …"): five per job
#: (submit, status, result, download, webhook), with the whole URL, so a signed output URL
#: or a webhook URL with a token in its query would land in the logs as it is.
HTTP_PER_REQUEST_LOGGERS: Final = ("httpx",)
#: Loggers kept at WARNING unless the level is DEBUG: one line per task or per request.
PER_CALL_LOGGERS: Final = CELERY_PER_TASK_LOGGERS + HTTP_PER_REQUEST_LOGGERS


def configure_logging(
    level: str = "INFO", json_format: bool = True, *, secrets: Iterable[str] = ()
) -> None:
    """Send the root logger to stdout (JSON or text). Calling it again replaces the setup."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    # Handler filters (unlike logger filters) also see records propagated from child loggers.
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretRedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Celery logs two INFO lines per task (received, succeeded): one pair per status check
    # is noise at scale and ~7 % of a check's CPU; httpx one per request (five a job, with
    # URLs we redact in our own lines). The job's own lines say what happened; at DEBUG
    # Celery's and httpx's come back.
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in PER_CALL_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
