"""Dead letters: broker messages that cannot be turned into a runnable task.

A message the worker cannot run (not JSON, not a kombu envelope, headers Celery chokes on, an
unknown task name, a body that is not ``[args, kwargs, embed]``) is written here and then
acknowledged, so it neither holds a prefetch slot nor comes back after the visibility timeout.

The store is one capped Redis list, :data:`~worker.constants.DEAD_LETTERS_KEY`, newest first
(index 0). Each entry is JSON::

    {"id": "<hex>", "reason": "invalid_headers", "at": "<ISO 8601 UTC>",
     "queue": "runcomfy.poll", "detail": "<why, one line>", "raw": "<the message as received>",
     "raw_bytes": 1234, "truncated": false}

``raw`` is the message as popped from the queue, as text (bytes that are not UTF-8 are kept
losslessly as surrogate escapes), cut at :data:`~worker.constants.DEAD_LETTER_RAW_MAX_BYTES`.
Messages carry ids and requests, never secrets (see :mod:`api_contracts.messages`).

Operators use ``runcomfy-worker dead-letters list|show|requeue|purge``; the worker uses
:func:`record`.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

import redis

from worker import metrics
from worker.constants import DEAD_LETTER_RAW_MAX_BYTES, DEAD_LETTERS_KEY, DEAD_LETTERS_MAX
from worker.errors import DeadLetterNotFoundError, NotRequeueableError

log = logging.getLogger(__name__)

#: Why a message was dead-lettered (the ``reason`` label of ``runcomfy_dead_letters_total``).
Reason = Literal[
    # not JSON, or JSON that is not a kombu envelope (no properties/delivery_tag, bad base64)
    "undecodable_envelope",
    # headers Celery cannot use: not a mapping, no/non-string task or id, bad timelimit/eta
    "invalid_headers",
    # a task name no worker registers
    "unknown_task",
    # body not decodable, content type not accepted, or not [args, kwargs, embed]
    "invalid_body",
    # anything else that raised while Celery took the message in (a bug: see the log)
    "internal_error",
]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)

#: Length of an entry id (uuid4 hex); shorter strings of digits are indexes.
_ID_LEN: Final = 32
#: ``detail`` is cut to this many characters.
_DETAIL_MAX: Final = 500

# Remove the entry (exactly, by value) and push its message back, atomically: two operators
# requeueing the same entry at once requeue it once.
_REQUEUE_LUA: Final = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry."""

    id: str
    reason: str
    at: str
    queue: str
    detail: str
    raw: str
    raw_bytes: int
    truncated: bool

    @classmethod
    def build(
        cls, reason: Reason, queue: str, raw: str | bytes, detail: str = "", *,
        max_raw_bytes: int = DEAD_LETTER_RAW_MAX_BYTES,
    ) -> DeadLetter:  # fmt: skip
        """An entry for ``raw`` (cut to ``max_raw_bytes``), stamped now, with a fresh id."""
        data = raw if isinstance(raw, bytes) else _encode(raw)
        detail = " ".join(detail.split())
        if len(detail) > _DETAIL_MAX:
            detail = detail[: _DETAIL_MAX - 3] + "..."
        return cls(
            id=uuid.uuid4().hex,
            reason=reason,
            at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            queue=queue,
            detail=detail,
            raw=data[:max_raw_bytes].decode("utf-8", "surrogateescape"),
            raw_bytes=len(data),
            truncated=len(data) > max_raw_bytes,
        )

    @property
    def requeueable(self) -> bool:
        """Can :meth:`DeadLetterStore.requeue` push it back? (complete, and with a queue)"""
        return not self.truncated and bool(self.queue)

    def raw_message(self) -> bytes:
        """The raw message as the bytes that were popped (what requeue pushes back)."""
        return _encode(self.raw)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, ``id`` first (what is stored and what ``--json`` prints)."""
        return asdict(self)

    def to_json(self) -> str:
        """The stored form: ASCII JSON, ``id`` first, so lone surrogates survive."""
        return json.dumps(self.to_dict(), ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        """Parse a stored entry; unknown fields are ignored, missing ones defaulted."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            # Not written by this module (pushed by hand?): show it, never crash, never requeue.
            raw = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
            return cls("", "?", "", "", "not a dead-letter entry", raw, len(raw), True)
        return cls(
            id=str(data.get("id") or ""),
            reason=str(data.get("reason") or "?"),
            at=str(data.get("at") or ""),
            queue=str(data.get("queue") or ""),
            detail=str(data.get("detail") or ""),
            raw=str(data.get("raw") or ""),
            raw_bytes=_int(data.get("raw_bytes")),
            truncated=bool(data.get("truncated", False)),
        )


@dataclass(frozen=True)
class RequeueReport:
    """What :meth:`DeadLetterStore.requeue_all` did."""

    requeued: list[DeadLetter] = field(default_factory=list)
    skipped: list[DeadLetter] = field(default_factory=list)


class DeadLetterStore:
    """The dead-letter list in Redis. Index 0 is the newest entry; indexes shift as entries
    arrive, ids do not."""

    #: Entries read per round trip when scanning (an entry can be ~64 KiB).
    BATCH: Final = 100

    def __init__(
        self,
        client: redis.Redis,
        *,
        key: str = DEAD_LETTERS_KEY,
        max_entries: int = DEAD_LETTERS_MAX,
        max_raw_bytes: int = DEAD_LETTER_RAW_MAX_BYTES,
    ) -> None:
        self._client = client
        self.key = key
        self.max_entries = max_entries
        self.max_raw_bytes = max_raw_bytes

    # ------------------------------------------------------------------ writing
    def push(self, reason: Reason, queue: str, raw: str | bytes, detail: str = "") -> DeadLetter:
        """Store one entry (newest first) and trim the list to ``max_entries``."""
        entry = DeadLetter.build(reason, queue, raw, detail, max_raw_bytes=self.max_raw_bytes)
        pipe = self._client.pipeline(transaction=True)
        pipe.lpush(self.key, entry.to_json())
        pipe.ltrim(self.key, 0, self.max_entries - 1)
        pipe.execute()
        return entry

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        """How many entries there are."""
        return int(self._client.llen(self.key))

    def entries(self, limit: int | None = None, start: int = 0) -> list[tuple[int, DeadLetter]]:
        """``(index, entry)`` pairs, newest first, from index ``start``; at most ``limit``."""
        if limit is not None and limit <= 0:
            return []
        stop = -1 if limit is None else start + limit - 1
        values = self._client.lrange(self.key, start, stop)
        return [(start + i, DeadLetter.from_json(v)) for i, v in enumerate(values)]

    def get(self, ref: int | str) -> tuple[int, DeadLetter]:
        """``(index, entry)`` for index ``ref`` (an int or a string of digits) or id ``ref``.

        Raises :class:`DeadLetterNotFoundError`."""
        index, stored = self._find(ref)
        return index, DeadLetter.from_json(stored)

    def _find(self, ref: int | str) -> tuple[int, bytes]:
        if isinstance(ref, int) or (ref.isdigit() and len(ref) < _ID_LEN):
            index = int(ref)
            value = self._client.lindex(self.key, index) if index >= 0 else None
            if value is None:
                raise DeadLetterNotFoundError(f"no dead letter at index {index}")
            return index, _as_bytes(value)
        prefix = json.dumps({"id": ref}, separators=(",", ":"))[:-1].encode()
        start = 0
        while values := self._client.lrange(self.key, start, start + self.BATCH - 1):
            for i, value in enumerate(values):
                if ref and _as_bytes(value).startswith(prefix + b","):
                    return start + i, _as_bytes(value)
            start += len(values)
        raise DeadLetterNotFoundError(f"no dead letter with id {ref!r}")

    # ------------------------------------------------------------------ operating
    def requeue(self, ref: int | str) -> DeadLetter:
        """Push the entry's raw message back onto its queue and remove the entry, atomically.

        Raises :class:`DeadLetterNotFoundError` (also when it was requeued or purged in
        between) or :class:`NotRequeueableError`."""
        _, stored = self._find(ref)
        entry = DeadLetter.from_json(stored)
        self._requeue_stored(stored, entry)
        return entry

    def _requeue_stored(self, stored: bytes, entry: DeadLetter) -> None:
        if entry.truncated:
            raise NotRequeueableError(
                f"dead letter {entry.id or '?'} keeps only the first {self.max_raw_bytes} of "
                f"its {entry.raw_bytes} bytes: it cannot be requeued"
            )
        if not entry.queue:
            raise NotRequeueableError(f"dead letter {entry.id or '?'} names no queue")
        script = self._client.register_script(_REQUEUE_LUA)
        if not script(keys=[self.key, entry.queue], args=[stored, entry.raw_message()]):
            raise DeadLetterNotFoundError(f"dead letter {entry.id} is gone (requeued or purged?)")

    def requeue_all(self) -> RequeueReport:
        """Requeue every requeueable entry there is now, oldest first (the order they came).

        Entries added meanwhile (e.g. a requeued message dead-lettered again) are left for
        the next call; truncated ones stay and are reported as skipped."""
        report = RequeueReport()
        remaining = self.count()
        kept = 0  # skipped entries stay at the tail (oldest end) of the list
        while remaining > 0:
            n = min(self.BATCH, remaining)
            values = self._client.lrange(self.key, -(kept + n), -(kept + 1))
            if not values:
                break
            for value in reversed(values):  # oldest first
                remaining -= 1
                stored = _as_bytes(value)
                entry = DeadLetter.from_json(stored)
                if not entry.requeueable:
                    report.skipped.append(entry)
                    kept += 1
                    continue
                try:
                    self._requeue_stored(stored, entry)
                except DeadLetterNotFoundError:
                    continue  # requeued or purged by someone else meanwhile
                report.requeued.append(entry)
        return report

    def purge(self) -> int:
        """Delete every entry; returns how many there were."""
        pipe = self._client.pipeline(transaction=True)
        pipe.llen(self.key)
        pipe.delete(self.key)
        count, _ = pipe.execute()
        return int(count)


def _encode(text: str) -> bytes:
    """``str`` -> the bytes it was decoded from (surrogate escapes back to raw bytes)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def record(
    client: Any, reason: Reason, queue: str, raw: str | bytes, detail: str = ""
) -> DeadLetter:
    """The worker's entry point: store a dead letter, count it, log it (one ERROR line).

    ``client`` is any redis-py client (the job store's, or kombu's own). Redis errors
    propagate; callers then do not ack, so the message is not lost with the entry.
    """
    entry = DeadLetterStore(client).push(reason, queue, raw, detail)
    metrics.DEAD_LETTERS.labels(reason).inc()
    log.error(
        "dead-lettered a message from %s (%s: %s); inspect with "
        "`runcomfy-worker dead-letters show %s`",
        queue or "?",
        reason,
        entry.detail or "-",
        entry.id,
    )
    return entry
