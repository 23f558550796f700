"""The job store: the single source of truth about every job.

:class:`JobStore` is the interface the steps, the producer and the CLI use;
:class:`RedisJobStore` keeps one Redis hash per job, and
:class:`~worker.jobs.memory.InMemoryJobStore` is its twin for unit tests. Every write is a
compare-and-set on the job's ``version`` (``scripts/update.lua``), so a stale or duplicated
task can never move a job backwards or apply a step twice; what a change means is
:func:`~worker.jobs.state.apply_change`, shared by both stores.

Hash fields of ``rcw:job:<id>``:

``record``   the JobRecord as JSON (what producers read)
``status``   copy of record.status (cheap reads, Lua checks)
``version``  incremented by every write
``seq``      hand-off number: every message the worker sends to itself carries the seq it
             expects; a message with another seq is stale and does nothing
``outbox``   the next message a step promised to send (JSON); if the sender died between
             the write and the publish, a redelivered message republishes it
``lease_owner``, ``lease_until``  while a submit is talking to upstream (empty otherwise)
``attempt``  retries of the current step; ``since`` when the current run of failures began
``rhash``    SHA-256 of the canonical request (idempotency comparisons)
``queued_ts``, ``started_ts``, ``checked_ts``  status checks that saw it queued (last),
             running (first), and the latest: the learned schedule's inputs
``calls``    status checks recorded by ``check.lua`` since the record was last written
             (added to record.status_calls on read)
``runs:<task>``  runs of a step that read the job with :meth:`JobStore.start_run`
             (``run.lua``): the archive step's first run knows no copy of its outputs can
             be in S3 yet

A status check that changes nothing about the job (same status, same queue position) is
written by ``scripts/check.lua`` instead of ``update.lua``: the same compare-and-set on
``version``, the hand-off (seq, outbox, due index) and the check marks, one ``HINCRBY`` of
``calls``, but no record to encode, validate and rewrite and no event to publish.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Final, Protocol

import redis

from api_contracts.jobs import JobError, JobRecord, JobRequest, JobStatus
from worker.constants import (
    DUE_KEY,
    EVENTS_CHANNEL_PREFIX,
    IDEMPOTENCY_KEY_PREFIX,
    INFLIGHT_KEY,
    JOB_KEY_PREFIX,
    STATS_KEY,
)
from worker.errors import IdempotencyConflictError, JobNotFoundError, TransitionRefusedError
from worker.jobs.state import (
    GENERATING,
    JobChange,
    Lease,
    Outbox,
    StoredJob,
    Unchanged,
    apply_change,
    apply_check,
    expects_progress,
    is_check_only,
    new_job,
    request_hash,
    utcnow,
)
from worker.services.redis_client import as_text

log = logging.getLogger(__name__)


class JobStore(Protocol):
    """Reads and compare-and-set writes of jobs. Implementations are thread-safe."""

    def get(self, job_id: str) -> StoredJob | None:
        """The job, or None when unknown or expired."""
        ...

    def load(self, job_id: str) -> StoredJob:
        """The job; JobNotFoundError when unknown or expired."""
        ...

    def start_run(self, job_id: str, task: str) -> StoredJob | None:
        """The job, as :meth:`get` reads it, for one run of the step ``task``, with
        ``runs``: how many runs of that step have read it so far, this one included (1: no
        earlier run of the step can have done any of its work). Counting is part of the
        read; None (and nothing counted) when the job is unknown or expired."""
        ...

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
        ...

    def create_many(
        self, jobs: Sequence[tuple[str, JobRequest]], *, now: datetime | None = None
    ) -> list[StoredJob | None]:
        """Create ``queued`` jobs at once; each entry is the new job, or None where that id
        already existed (left unchanged)."""
        ...

    def update(
        self, job: StoredJob, change: JobChange, *, now: datetime | None = None
    ) -> StoredJob | None:
        """Compare-and-set ``job`` (as read) to ``change`` applied. Returns the new job, or
        None when the job changed since it was read (the caller's step is stale).
        Raises TransitionRefusedError when the status change is not allowed."""
        ...

    def claim_idempotency_key(self, key: str, job_id: str, request: JobRequest) -> str:
        """Bind ``key`` to ``job_id``. Returns the job id the key names: ours, or an earlier
        job with the same request. A different request raises IdempotencyConflictError."""
        ...

    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump a service-wide counter (e.g. ambiguous_submits)."""
        ...

    def stats(self) -> dict[str, int]:
        """Service-wide counters."""
        ...

    def in_flight(self) -> int:
        """How many jobs are not final."""
        ...

    def now(self) -> float:
        """The store's clock (Redis TIME): the one clock due times are compared with."""
        ...

    def due(self, now: float, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` jobs whose progress is overdue at ``now``: (job id, due time),
        most overdue first. Costs O(log N + limit), never a scan of all jobs."""
        ...

    def due_count(self, now: float) -> int:
        """How many jobs are overdue at ``now``."""
        ...

    def set_due(self, job_id: str, at: float | None) -> None:
        """Move a job's due time to ``at`` (None: out of the index). Only for a job in the
        index: a job that left it meanwhile stays out."""
        ...


#: Hash field counting the runs of one step (``runs:<task name>``, ``run.lua``).
RUNS_FIELD_PREFIX: Final = "runs:"


def job_key(job_id: str) -> str:
    """Redis key of a job's hash."""
    return JOB_KEY_PREFIX + job_id


def events_channel(job_id: str) -> str:
    """Pub/sub channel announcing changes of one job."""
    return EVENTS_CHANNEL_PREFIX + job_id


def script(name: str) -> str:
    """The text of one of ``worker/jobs/scripts/*.lua``."""
    return resources.files("worker.jobs").joinpath("scripts", name).read_text(encoding="utf-8")


class RedisJobStore:
    """:class:`JobStore` on Redis: one hash per job, Lua compare-and-set writes."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int,
        deadline_s: float | None = None,
        submit_grace_s: float = 300.0,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.deadline_s = deadline_s
        self.submit_grace_s = submit_grace_s
        self._update = client.register_script(script("update.lua"))
        self._create = client.register_script(script("create.lua"))
        self._claim = client.register_script(script("claim.lua"))
        self._check = client.register_script(script("check.lua"))
        self._run = client.register_script(script("run.lua"))

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> StoredJob | None:
        """The job (with Redis TIME as ``read_at``, in the same round trip), or None."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.time()
            raw, (seconds, micros) = pipe.execute()
        if not raw:
            return None
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        return decode_job(fields, read_at=float(seconds) + float(micros) / 1e6)

    def start_run(self, job_id: str, task: str) -> StoredJob | None:
        """Read and count one run of ``task`` (``run.lua``): the same round trip as
        :meth:`get`."""
        answer = self._run(keys=[job_key(job_id)], args=[RUNS_FIELD_PREFIX + task])
        if not answer:
            return None
        seconds, micros, runs, flat = answer
        fields = {as_text(flat[i]): as_text(flat[i + 1]) for i in range(0, len(flat), 2)}
        read_at = float(as_text(seconds)) + float(as_text(micros)) / 1e6
        return decode_job(fields, read_at=read_at, runs=int(runs))

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
        """The one way a job is born (see :meth:`JobStore.create_if_absent`)."""
        job = new_job(job_id, request, status=status, error=error, now=now or utcnow())
        if self._create(keys=_keys(job_id), args=self._create_args(job)):
            return job, True
        return self.load(job_id), False

    def create_many(
        self, jobs: Sequence[tuple[str, JobRequest]], *, now: datetime | None = None
    ) -> list[StoredJob | None]:
        """Create ``queued`` jobs in one round trip (see :meth:`JobStore.create_many`)."""
        now = now or utcnow()
        born = [new_job(i, r, status=JobStatus.QUEUED, error=None, now=now) for i, r in jobs]
        with self.redis.pipeline(transaction=False) as pipe:
            for job in born:
                self._create(keys=_keys(job.id), args=self._create_args(job), client=pipe)
            created = pipe.execute()
        return [job if ok else None for job, ok in zip(born, created, strict=True)]

    def update(
        self, job: StoredJob, change: JobChange, *, now: datetime | None = None
    ) -> StoredJob | None:
        """Compare-and-set ``job`` to ``change`` applied (see :meth:`JobStore.update`)."""
        if is_check_only(job, change):
            return self._record_check(job, change)
        try:
            after = apply_change(job, change, now=now or utcnow())
        except TransitionRefusedError:
            log.warning("refused transition for job %s: %s", job.id, change.status)
            raise
        final = after.status.is_terminal
        ok = self._update(
            keys=_keys(job.id),
            args=[
                str(job.version),
                str(self.ttl_s) if final else "0",
                "1" if final else "0",
                job.id,
                after.status.value,
                _due_arg(after, change),
                str(self.deadline_s) if self.deadline_s and after.status in GENERATING else "",
                *_flatten(encode_job(after)),
            ],
        )
        return after if ok else None

    def _record_check(self, job: StoredJob, change: JobChange) -> StoredJob | None:
        """A status check that changed nothing: ``check.lua``, the record untouched."""
        after = apply_check(job, change)
        marks = {"version": str(after.version), **_check_marks(after)}
        ok = self._check(
            keys=[job_key(job.id), DUE_KEY],
            args=[
                str(job.version),
                job.id,
                _due_arg(after, change),
                str(self.deadline_s) if self.deadline_s and after.status in GENERATING else "",
                *_flatten(marks),
            ],
        )
        return after if ok else None

    def _create_args(self, job: StoredJob) -> list[str]:
        final = job.status.is_terminal
        return [
            str(self.ttl_s) if final else "0",
            "0" if final else "1",
            str(job.record.created_at.timestamp()),
            job.id,
            job.status.value,
            str(self.submit_grace_s) if expects_progress(job) else "",
            *_flatten(encode_job(job)),
        ]

    # ---------------------------------------------------------------- idempotency
    def claim_idempotency_key(self, key: str, job_id: str, request: JobRequest) -> str:
        """Bind ``key`` to ``job_id`` and the request's hash in one step (``claim.lua``), so
        two producers (or two entries of one batch) with one key and different requests
        always conflict, whichever creates its job first."""
        rhash = request_hash(request)
        held = as_text(
            self._claim(keys=[IDEMPOTENCY_KEY_PREFIX + key], args=[f"{job_id}|{rhash}", self.ttl_s])
        )
        held_id, _, held_hash = held.partition("|")
        if not held_hash:  # bound by an older release: only the job id is stored
            job = self.get(held_id)
            held_hash = job.rhash if job is not None else rhash
        if held_hash != rhash:
            raise IdempotencyConflictError(key, held_id)
        return held_id

    # ---------------------------------------------------------------- figures
    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump a service-wide counter (e.g. ambiguous_submits)."""
        self.redis.hincrby(STATS_KEY, name, amount)

    def stats(self) -> dict[str, int]:
        """Service-wide counters."""
        return {as_text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def in_flight(self) -> int:
        """How many jobs are not final."""
        return int(self.redis.zcard(INFLIGHT_KEY))

    # ---------------------------------------------------------------- due index
    def now(self) -> float:
        """Redis TIME, in epoch seconds."""
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def due(self, now: float, limit: int) -> list[tuple[str, float]]:
        """Overdue jobs (ZRANGEBYSCORE with a LIMIT)."""
        rows = self.redis.zrangebyscore(DUE_KEY, "-inf", now, start=0, num=limit, withscores=True)
        return [(as_text(row[0]), float(row[1])) for row in rows if isinstance(row, tuple | list)]

    def due_count(self, now: float) -> int:
        """How many jobs are overdue."""
        return int(self.redis.zcount(DUE_KEY, "-inf", now))

    def set_due(self, job_id: str, at: float | None) -> None:
        """Move (XX: never re-add) or drop a job's due time."""
        if at is None:
            self.redis.zrem(DUE_KEY, job_id)
        else:
            self.redis.zadd(DUE_KEY, {job_id: at}, xx=True)


def encode_job(job: StoredJob) -> dict[str, str]:
    """The hash fields of a job."""
    return {
        "record": job.record.model_dump_json(),
        "status": job.status.value,
        "version": str(job.version),
        **_check_marks(job),
        "lease_owner": job.lease.owner if job.lease else "",
        "lease_until": str(job.lease.until) if job.lease else "",
        "attempt": str(job.attempt),
        "since": str(job.since),
        "rhash": job.rhash,
        "admitted_ts": str(job.admitted_ts),
        "calls": "0",  # the record holds them all again
    }


def _check_marks(job: StoredJob) -> dict[str, str]:
    """The hand-off and check-mark fields: what a full write and ``check.lua`` both set."""
    return {
        "seq": str(job.seq),
        "outbox": job.outbox.to_json() if job.outbox else "",
        "queued_ts": repr(job.queued_ts),
        "started_ts": repr(job.started_ts),
        "checked_ts": repr(job.checked_ts),
    }


def decode_job(f: Mapping[str, str], *, read_at: float = 0.0, runs: int = 0) -> StoredJob:
    """A job from its hash fields, read at ``read_at`` (Redis TIME) by the ``runs``-th run
    of a step (:meth:`JobStore.start_run`; 0 for other reads)."""
    owner = f.get("lease_owner", "")
    record = JobRecord.model_validate_json(f["record"])
    calls = int(f.get("calls") or 0)
    if calls:
        record = record.model_copy(update={"status_calls": record.status_calls + calls})
    return StoredJob(
        record=record,
        version=int(f["version"]),
        seq=int(f.get("seq") or 0),
        outbox=Outbox.from_json(f.get("outbox", "")),
        lease=Lease(owner, float(f.get("lease_until") or 0)) if owner else None,
        attempt=int(f.get("attempt") or 0),
        since=float(f.get("since") or 0),
        rhash=f.get("rhash", ""),
        read_at=read_at,
        created_ts=float(f.get("created_ts") or 0),
        admitted_ts=float(f.get("admitted_ts") or 0),
        queued_ts=float(f.get("queued_ts") or 0),
        started_ts=float(f.get("started_ts") or 0),
        checked_ts=float(f.get("checked_ts") or 0),
        runs=runs,
    )


def _keys(job_id: str) -> list[str]:
    return [job_key(job_id), INFLIGHT_KEY, events_channel(job_id), DUE_KEY]


def _due_arg(after: StoredJob, change: JobChange) -> str:
    """update.lua's "due in" argument: out of the index once nothing is expected any more."""
    if not expects_progress(after) or change.due_in is None:
        return "-"
    if isinstance(change.due_in, Unchanged):
        return ""
    return repr(max(0.0, change.due_in))


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]
