"""The job store: one Redis hash per job, the single source of truth.

Every write is a compare-and-set on the job's ``version`` (a Lua script), so a stale or
duplicated task can never move a job backwards or apply a step twice; which status changes
are allowed at all is the pure function :func:`transition_allowed`.

Hash fields of ``rcw:job:<id>``:

``record``   the JobRecord as JSON (what producers read)
``status``   copy of record.status (cheap reads, Lua checks)
``version``  incremented by every write
``seq``      hand-off number: every message the worker sends to itself carries the seq it
             expects; a message with another seq is stale and does nothing
``outbox``   the next message a step promised to send (JSON); if the sender died between
             the write and the publish, a redelivered message republishes it
``lease``    ``owner|until`` while a submit is talking to upstream
``attempt``  retries of the current step; ``since`` when the current run of failures began
``rhash``    SHA-256 of the canonical request (idempotency comparisons)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import redis

from api_contracts.jobs import JobError, JobRecord, JobRequest, JobStatus, WebhookInfo
from worker.constants import (
    EVENTS_CHANNEL_PREFIX,
    IDEMPOTENCY_KEY_PREFIX,
    INFLIGHT_KEY,
    JOB_KEY_PREFIX,
    STATS_KEY,
)
from worker.errors import IdempotencyConflictError, JobNotFoundError, TransitionRefusedError

log = logging.getLogger(__name__)

S = JobStatus
_ALLOWED: Final[dict[JobStatus, frozenset[JobStatus]]] = {
    S.QUEUED: frozenset({S.QUEUED, S.SUBMITTING, S.FAILED, S.CANCELLED}),
    S.SUBMITTING: frozenset({S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS, S.FAILED, S.CANCELLED}),
    S.IN_QUEUE: frozenset({S.IN_QUEUE, S.IN_PROGRESS, S.ARCHIVING, S.FAILED, S.CANCELLED}),
    S.IN_PROGRESS: frozenset({S.IN_PROGRESS, S.ARCHIVING, S.FAILED, S.CANCELLED}),
    S.ARCHIVING: frozenset({S.ARCHIVING, S.SUCCEEDED, S.FAILED}),
    # Final states only take updates that keep the status (webhook deliveries, notes).
    S.SUCCEEDED: frozenset({S.SUCCEEDED}),
    S.FAILED: frozenset({S.FAILED}),
    S.CANCELLED: frozenset({S.CANCELLED}),
}


def transition_allowed(current: JobStatus, new: JobStatus) -> bool:
    """May a job in ``current`` be written with status ``new``? (Never backwards.)"""
    return new in _ALLOWED[current]


def utcnow() -> datetime:
    """Aware UTC now (one place, so tests can reason about it)."""
    return datetime.now(UTC)


def request_hash(request: JobRequest) -> str:
    """SHA-256 of the canonical JSON of a request: equal requests, equal hashes."""
    canonical = json.dumps(
        request.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Outbox:
    """A message a step promised to send: task name, the seq it carries, when it is due."""

    task: str
    seq: int
    due_at: float
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialised form stored in the hash."""
        return json.dumps(
            {"task": self.task, "seq": self.seq, "due_at": self.due_at, "kwargs": self.kwargs}
        )

    @classmethod
    def from_json(cls, raw: str) -> Outbox | None:
        """Parse the stored form; empty means none."""
        if not raw:
            return None
        data = json.loads(raw)
        return cls(
            task=str(data["task"]),
            seq=int(data["seq"]),
            due_at=float(data["due_at"]),
            kwargs=dict(data.get("kwargs") or {}),
        )


@dataclass(frozen=True)
class StoredJob:
    """A job as read from the store, with the bookkeeping that is not part of the record."""

    record: JobRecord
    version: int
    seq: int
    outbox: Outbox | None
    lease_owner: str
    lease_until: float
    attempt: int
    since: float
    rhash: str

    @property
    def id(self) -> str:
        """The job id."""
        return self.record.id

    @property
    def status(self) -> JobStatus:
        """The job's status."""
        return self.record.status


_UNSET: Any = object()

# KEYS: job hash, inflight zset, events channel. ARGV: expected version, ttl seconds (0 = keep),
# inflight action ("add"/"rem"/""), job id, score, event payload, then field/value pairs.
_CAS_LUA = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] == 'rem' then redis.call('ZREM', KEYS[2], ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[6])
return 1
"""

# Same KEYS/ARGV as above, minus the version check: only when the hash does not exist.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] == 'add' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[6])
return 1
"""


def job_key(job_id: str) -> str:
    """Redis key of a job's hash."""
    return JOB_KEY_PREFIX + job_id


def events_channel(job_id: str) -> str:
    """Pub/sub channel announcing changes of one job."""
    return EVENTS_CHANNEL_PREFIX + job_id


class JobStore:
    """Reads and compare-and-set writes of job hashes. Thread-safe (redis-py pools)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._cas = client.register_script(_CAS_LUA)
        self._create = client.register_script(_CREATE_LUA)

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> StoredJob | None:
        """The job, or None when unknown or expired."""
        raw = self.redis.hgetall(job_key(job_id))
        return _decode(raw) if raw else None

    def load(self, job_id: str) -> StoredJob:
        """The job; JobNotFoundError when unknown or expired."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} (never created, or expired)")
        return job

    # ---------------------------------------------------------------- writes
    def create_if_absent(
        self,
        job_id: str,
        request: JobRequest | None,
        *,
        status: JobStatus = JobStatus.QUEUED,
        error: JobError | None = None,
        now: datetime | None = None,
    ) -> tuple[StoredJob, bool]:
        """The one way a job is born. Returns ``(job, created)``; an existing job is returned
        unchanged (so a producer and a redelivered submit can both call it)."""
        fields, keys, args = _birth(
            job_id, request, status=status, error=error, now=now or utcnow(), ttl_s=self.ttl_s
        )
        if self._create(keys=keys, args=args):
            return _decode_fields(fields), True
        return self.load(job_id), False

    def create_many(
        self, jobs: Sequence[tuple[str, JobRequest]], *, now: datetime | None = None
    ) -> list[StoredJob | None]:
        """Create ``queued`` jobs in one round trip; each entry is the new job, or None where
        that id already existed (left unchanged)."""
        now = now or utcnow()
        births = [
            _birth(i, r, status=JobStatus.QUEUED, error=None, now=now, ttl_s=self.ttl_s)
            for i, r in jobs
        ]
        with self.redis.pipeline(transaction=False) as pipe:
            for _fields, keys, args in births:
                self._create(keys=keys, args=args, client=pipe)
            created = pipe.execute()
        return [
            _decode_fields(fields) if ok else None
            for (fields, _k, _a), ok in zip(births, created, strict=True)
        ]

    def update(
        self,
        job: StoredJob,
        *,
        status: JobStatus | None = None,
        now: datetime | None = None,
        seq: int | None = None,
        outbox: Outbox | None = _UNSET,
        lease: tuple[str, float] | None = _UNSET,
        attempt: int | None = None,
        since: float | None = None,
        **record_changes: Any,
    ) -> StoredJob | None:
        """Compare-and-set ``job`` (as read) to its new state. Returns the new StoredJob, or
        None when the job changed since it was read (the caller's step is stale).
        Raises TransitionRefusedError when the status change is not allowed."""
        now = now or utcnow()
        new_status = status or job.status
        if not transition_allowed(job.status, new_status):
            log.warning("refused transition %s -> %s for job %s", job.status, new_status, job.id)
            raise TransitionRefusedError(
                f"job {job.id}: {job.status.value} -> {new_status.value} is not allowed"
            )
        changes: dict[str, Any] = {"status": new_status, "updated_at": now, **record_changes}
        if new_status.is_terminal and job.record.finished_at is None:
            changes.setdefault("finished_at", now)
        record = job.record.model_copy(update=changes)
        record = JobRecord.model_validate(record.model_dump())  # re-validate nested updates
        fields: dict[str, str] = {
            "record": record.model_dump_json(),
            "status": new_status.value,
            "version": str(job.version + 1),
        }
        new_seq = job.seq if seq is None else seq
        fields["seq"] = str(new_seq)
        new_outbox = job.outbox if outbox is _UNSET else outbox
        fields["outbox"] = new_outbox.to_json() if new_outbox else ""
        new_lease = (job.lease_owner, job.lease_until) if lease is _UNSET else lease
        fields["lease"] = f"{new_lease[0]}|{new_lease[1]}" if new_lease else ""
        new_attempt = job.attempt if attempt is None else attempt
        new_since = job.since if since is None else since
        fields["attempt"] = str(new_attempt)
        fields["since"] = str(new_since)
        terminal = new_status.is_terminal
        ok = self._cas(
            keys=[job_key(job.id), INFLIGHT_KEY, events_channel(job.id)],
            args=[
                str(job.version),
                str(self.ttl_s) if terminal else "0",
                "rem" if terminal else "",
                job.id,
                "0",
                new_status.value,
                *_flatten(fields),
            ],
        )
        if not ok:
            return None
        return StoredJob(
            record=record,
            version=job.version + 1,
            seq=new_seq,
            outbox=new_outbox,
            lease_owner=new_lease[0] if new_lease else "",
            lease_until=new_lease[1] if new_lease else 0.0,
            attempt=new_attempt,
            since=new_since,
            rhash=job.rhash,
        )

    # ---------------------------------------------------------------- idempotency
    def claim_idempotency_key(self, key: str, job_id: str, request: JobRequest) -> str:
        """Bind ``key`` to ``job_id`` (SET NX). Returns the job id the key names: ours, or an
        earlier job with the same request. A different request raises IdempotencyConflictError."""
        idem_key = IDEMPOTENCY_KEY_PREFIX + key
        if self.redis.set(idem_key, job_id, nx=True, ex=self.ttl_s):
            return job_id
        existing = self.redis.get(idem_key)
        if existing is None:  # expired between the two calls: try once more
            return self.claim_idempotency_key(key, job_id, request)
        existing_id = _text(existing)
        job = self.get(existing_id)
        if job is not None and job.rhash and job.rhash != request_hash(request):
            raise IdempotencyConflictError(key, existing_id)
        return existing_id

    # ---------------------------------------------------------------- figures
    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump a service-wide counter (e.g. ambiguous_submits)."""
        self.redis.hincrby(STATS_KEY, name, amount)

    def stats(self) -> dict[str, int]:
        """Service-wide counters."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def in_flight(self) -> int:
        """How many jobs are not final."""
        return int(self.redis.zcard(INFLIGHT_KEY))


def _birth(
    job_id: str,
    request: JobRequest | None,
    *,
    status: JobStatus,
    error: JobError | None,
    now: datetime,
    ttl_s: int,
) -> tuple[dict[str, str], list[str], list[str]]:
    """Hash fields, script keys and script args that create one job."""
    record = JobRecord(
        id=job_id,
        status=status,
        created_at=now,
        updated_at=now,
        finished_at=now if status.is_terminal else None,
        request=request,
        error=error,
        webhook=WebhookInfo(id=f"msg_{job_id}")
        if request is not None and request.webhook_url
        else None,
    )
    fields = {
        "record": record.model_dump_json(),
        "status": status.value,
        "version": "1",
        "seq": "0",
        "outbox": "",
        "lease": "",
        "attempt": "0",
        "since": "0",
        "rhash": request_hash(request) if request is not None else "",
    }
    keys = [job_key(job_id), INFLIGHT_KEY, events_channel(job_id)]
    args = [
        "",
        str(ttl_s) if status.is_terminal else "0",
        "" if status.is_terminal else "add",
        job_id,
        str(now.timestamp()),
        status.value,
        *_flatten(fields),
    ]
    return fields, keys, args


def _flatten(fields: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        out.extend((k, v))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[bytes | str, bytes | str]) -> StoredJob:
    return _decode_fields({_text(k): _text(v) for k, v in raw.items()})


def _decode_fields(f: Mapping[str, str]) -> StoredJob:
    owner, _, until = (f.get("lease") or "").partition("|")
    return StoredJob(
        record=JobRecord.model_validate_json(f["record"]),
        version=int(f["version"]),
        seq=int(f.get("seq") or 0),
        outbox=Outbox.from_json(f.get("outbox", "")),
        lease_owner=owner,
        lease_until=float(until or 0),
        attempt=int(f.get("attempt") or 0),
        since=float(f.get("since") or 0),
        rhash=f.get("rhash", ""),
    )
