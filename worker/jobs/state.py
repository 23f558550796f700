"""A job as the store holds it, and the one typed way to change it.

Pure values and functions, shared by every :class:`~worker.jobs.store.JobStore`: the Redis
store and the in-memory one differ only in where the bytes live, never in what a change
means. A :class:`JobChange` names each field it sets; everything else is :data:`UNCHANGED`
(one marker for "keep", so ``None`` can mean "clear"). :func:`apply_change` turns a job as
read plus a change into the job as it will be written, or raises
:class:`~worker.errors.TransitionRefusedError` when the status change is not allowed.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, Union

from api_contracts.jobs import (
    ArchivedOutput,
    JobError,
    JobRecord,
    JobRequest,
    JobStatus,
    WaitInfo,
    WebhookInfo,
)
from worker.errors import TransitionRefusedError

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
    """SHA-256 of the canonical JSON of a request: equal requests, equal hashes. Fields added
    later are left out at their default, so a request hashes as it did before they existed."""
    data = request.model_dump(mode="json", by_alias=True)
    for name, default in (("tenant", None), ("priority", "normal")):
        if data.get(name) == default:
            data.pop(name, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`."""

    UNCHANGED = "UNCHANGED"

    def __repr__(self) -> str:
        return "UNCHANGED"


#: "Keep the stored value" in a :class:`JobChange` (``None`` means "clear" where allowed).
UNCHANGED: Final = Unchanged.UNCHANGED

T = TypeVar("T")
#: A field of a change: a new value, or UNCHANGED.
Maybe = Union[T, Unchanged]  # noqa: UP007 - a generic alias; ``T | Unchanged`` is not one


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
class Lease:
    """A submit talking to upstream: who holds the job, and until when (epoch seconds)."""

    owner: str
    until: float


@dataclass(frozen=True)
class StoredJob:
    """A job as read from the store, with the bookkeeping that is not part of the record."""

    record: JobRecord
    version: int
    seq: int = 0
    outbox: Outbox | None = None
    lease: Lease | None = None
    attempt: int = 0
    since: float = 0.0
    rhash: str = ""
    #: the store's clock (Redis TIME) when this copy was read: leases, due times and ages
    #: are compared with it, never with a worker's own clock
    read_at: float = 0.0
    #: the store's clock at the job's birth
    created_ts: float = 0.0
    #: when the job got a RunComfy slot after waiting for one (its deadline counts from then)
    admitted_ts: float = 0.0
    #: status checks, on the store's clock (0: none yet): the last that saw it ``in_queue``,
    #: the first that saw it running, and the latest (the learned schedule's inputs)
    queued_ts: float = 0.0
    started_ts: float = 0.0
    checked_ts: float = 0.0
    #: read by :meth:`~worker.jobs.store.JobStore.start_run`: how many runs of the reading
    #: step have read the job so far, this one included (1: the first); 0 for other reads
    runs: int = 0

    @property
    def id(self) -> str:
        """The job id."""
        return self.record.id

    @property
    def status(self) -> JobStatus:
        """The job's status."""
        return self.record.status

    @property
    def born_at(self) -> float:
        """The job's birth on the store's clock (the record's created_at for old records)."""
        return self.created_ts or self.record.created_at.timestamp()

    @property
    def age_s(self) -> float:
        """Seconds the job has counted against JOB_DEADLINE_S when it was read (from its
        birth, or from its admission if it waited for a slot), by the store's clock."""
        return self.read_at - (self.admitted_ts or self.born_at)


@dataclass(frozen=True, kw_only=True)
class JobChange:
    """One compare-and-set write. Each field is a new value or UNCHANGED.

    ``due_in``, ``seq``, ``outbox``, ``lease``, ``attempt`` and ``since`` are bookkeeping
    beside the record; the rest are :class:`~api_contracts.jobs.JobRecord` fields.
    """

    status: Maybe[JobStatus] = UNCHANGED
    #: seconds from now (Redis TIME) until the job's next progress is overdue; None: nothing
    #: is expected any more. UNCHANGED keeps the current due time.
    due_in: Maybe[float | None] = UNCHANGED
    seq: Maybe[int] = UNCHANGED
    outbox: Maybe[Outbox | None] = UNCHANGED
    lease: Maybe[Lease | None] = UNCHANGED
    attempt: Maybe[int] = UNCHANGED
    since: Maybe[float] = UNCHANGED
    admitted_at: Maybe[float] = UNCHANGED
    queued_ts: Maybe[float] = UNCHANGED
    started_ts: Maybe[float] = UNCHANGED
    checked_ts: Maybe[float] = UNCHANGED
    error: Maybe[JobError | None] = UNCHANGED
    request_id: Maybe[str] = UNCHANGED
    submitted_at: Maybe[datetime] = UNCHANGED
    queue_position: Maybe[int | None] = UNCHANGED
    status_calls: Maybe[int] = UNCHANGED
    outputs: Maybe[Sequence[ArchivedOutput]] = UNCHANGED
    webhook: Maybe[WebhookInfo] = UNCHANGED
    notes: Maybe[Sequence[str]] = UNCHANGED
    wait: Maybe[WaitInfo | None] = UNCHANGED

    def but(self, **overrides: Any) -> JobChange:
        """This change with some fields replaced (a typo is a TypeError, not a silent no-op)."""
        return replace(self, **overrides)


_RECORD_FIELDS: Final = (
    "error",
    "request_id",
    "submitted_at",
    "queue_position",
    "status_calls",
    "outputs",
    "webhook",
    "notes",
    "wait",
)
_BOOKKEEPING: Final = {
    "status",
    "due_in",
    "seq",
    "outbox",
    "lease",
    "attempt",
    "since",
    "admitted_at",
    "queued_ts",
    "started_ts",
    "checked_ts",
}
#: JobChange's field names, once (is_check_only runs on every write).
_CHANGE_FIELDS: Final = tuple(f.name for f in fields(JobChange))
assert set(_RECORD_FIELDS) | _BOOKKEEPING == set(_CHANGE_FIELDS)


#: Statuses in which the job deadline (JOB_DEADLINE_S) applies: upstream has not finished.
GENERATING: Final = frozenset({S.QUEUED, S.SUBMITTING, S.IN_QUEUE, S.IN_PROGRESS})


def webhook_pending(job: StoredJob) -> bool:
    """Does the job still owe its producer a webhook?"""
    info = job.record.webhook
    return info is not None and info.state == "pending"


def expects_progress(job: StoredJob) -> bool:
    """Should the due index hold this job? Every non-final job, and final ones still owing
    a webhook."""
    return not job.status.is_terminal or webhook_pending(job)


def _pick(new: Maybe[T], old: T) -> T:
    return old if isinstance(new, Unchanged) else new


def apply_change(job: StoredJob, change: JobChange, *, now: datetime) -> StoredJob:
    """The job as it will be stored after ``change`` (version + 1), or
    TransitionRefusedError when the status change is not allowed from the job's status."""
    new_status = _pick(change.status, job.status)
    if not transition_allowed(job.status, new_status):
        raise TransitionRefusedError(
            f"job {job.id}: {job.status.value} -> {new_status.value} is not allowed"
        )
    updates: dict[str, Any] = {"status": new_status, "updated_at": now}
    for name in _RECORD_FIELDS:
        value = getattr(change, name)
        if not isinstance(value, Unchanged):
            updates[name] = list(value) if name in ("outputs", "notes") else value
    if new_status.is_terminal and job.record.finished_at is None:
        updates["finished_at"] = now
    # model_copy does not validate: round-trip so a bad nested value fails here, not later.
    record = JobRecord.model_validate(job.record.model_copy(update=updates).model_dump())
    return StoredJob(
        record=record,
        version=job.version + 1,
        lease=_pick(change.lease, job.lease),
        attempt=_pick(change.attempt, job.attempt),
        since=_pick(change.since, job.since),
        rhash=job.rhash,
        read_at=job.read_at,
        created_ts=job.created_ts,
        admitted_ts=_pick(change.admitted_at, job.admitted_ts),
        **_check_marks(job, change),
    )


def _check_marks(job: StoredJob, change: JobChange) -> dict[str, Any]:
    """The hand-off and check marks of ``job`` after ``change`` (both kinds of write)."""
    return {
        "seq": _pick(change.seq, job.seq),
        "outbox": _pick(change.outbox, job.outbox),
        "queued_ts": _pick(change.queued_ts, job.queued_ts),
        "started_ts": _pick(change.started_ts, job.started_ts),
        "checked_ts": _pick(change.checked_ts, job.checked_ts),
    }


#: The fields a status check that changes nothing may write (:func:`apply_check`): the
#: hand-off, the check marks and the call count; never the record itself.
CHECK_FIELDS: Final = ("seq", "outbox", "due_in", "queued_ts", "started_ts", "checked_ts")


def is_check_only(job: StoredJob, change: JobChange) -> bool:
    """Does ``change`` only record one more status check of a job that did not change?
    (status, queue position and every record field as they are, no error streak to
    reset: the store can then skip rewriting the record.)"""
    for name in _CHANGE_FIELDS:
        value = getattr(change, name)
        if isinstance(value, Unchanged) or name in CHECK_FIELDS:
            continue
        if name == "status" and value == job.status:
            continue
        if name == "queue_position" and value == job.record.queue_position:
            continue
        if name == "status_calls" and value == job.record.status_calls + 1:
            continue
        if name == "attempt" and value == job.attempt == 0:
            continue
        return False
    return not isinstance(change.status_calls, Unchanged)


def apply_check(job: StoredJob, change: JobChange) -> StoredJob:
    """The job after a check-only change (:func:`is_check_only`): version + 1, one more
    status call, the hand-off and marks of ``change``; the record otherwise as it was (its
    ``updated_at`` too: nothing about the job changed)."""
    record = job.record.model_copy(update={"status_calls": job.record.status_calls + 1})
    return replace(job, record=record, version=job.version + 1, **_check_marks(job, change))


def new_job(
    job_id: str,
    request: JobRequest | None,
    *,
    status: JobStatus,
    error: JobError | None,
    now: datetime,
) -> StoredJob:
    """A job as it is born (version 1, seq 0): the one shape every store creates."""
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
    return StoredJob(
        record=record,
        version=1,
        rhash=request_hash(request) if request is not None else "",
        read_at=now.timestamp(),
        created_ts=now.timestamp(),
    )
