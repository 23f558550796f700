"""An in-memory :class:`~worker.jobs.store.JobStore` for unit tests of the steps.

Same contract as the Redis store (compare-and-set on ``version``, the same
:func:`~worker.jobs.state.apply_change`, idempotency keys, counters), kept in dicts under a
lock. It also records what the Redis store would do beside the write, so tests can assert
on it: which jobs got a TTL (final ones) and every published event.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from api_contracts.jobs import JobError, JobRequest, JobStatus
from worker.errors import IdempotencyConflictError, JobNotFoundError
from worker.jobs.state import (
    GENERATING,
    JobChange,
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


class InMemoryJobStore:
    """:class:`~worker.jobs.store.JobStore` in process memory. Thread-safe."""

    def __init__(
        self,
        *,
        ttl_s: int = 7 * 24 * 3600,
        deadline_s: float | None = None,
        submit_grace_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.deadline_s = deadline_s
        self.submit_grace_s = submit_grace_s
        self.clock = clock
        #: the due index: job id -> when its progress is overdue
        self.due_at: dict[str, float] = {}
        self.jobs: dict[str, StoredJob] = {}
        #: job id -> TTL given to it (set when a job becomes final, as Redis EXPIRE would)
        self.ttls: dict[str, int] = {}
        #: (job id, status) for every write, as published on the events channel
        self.events: list[tuple[str, str]] = []
        self.idempotency: dict[str, tuple[str, str]] = {}
        self.counters: Counter[str] = Counter()
        #: writes that took the check-only path (check.lua in the Redis store)
        self.check_writes = 0
        #: (job id, task) -> runs counted by start_run (run.lua in the Redis store)
        self.runs: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> StoredJob | None:
        """The job (read at the twin's clock), or None when unknown."""
        with self._lock:
            job = self.jobs.get(job_id)
        return None if job is None else replace(job, read_at=self.clock(), runs=0)

    def start_run(self, job_id: str, task: str) -> StoredJob | None:
        """The job, with one more run of ``task`` counted (none when unknown)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            self.runs[job_id, task] += 1
            runs = self.runs[job_id, task]
        return replace(job, read_at=self.clock(), runs=runs)

    def load(self, job_id: str) -> StoredJob:
        """The job; JobNotFoundError when unknown."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} (never created, or expired)")
        return job

    def create_if_absent(
        self,
        job_id: str,
        request: JobRequest | None,
        *,
        status: JobStatus = JobStatus.QUEUED,
        error: JobError | None = None,
        now: datetime | None = None,
    ) -> tuple[StoredJob, bool]:
        """The one way a job is born; an existing job is returned unchanged."""
        job = new_job(job_id, request, status=status, error=error, now=now or utcnow())
        job = replace(job, read_at=self.clock(), created_ts=self.clock())
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                return replace(existing, read_at=self.clock()), False
            self._write(job)
            if expects_progress(job):
                self.due_at[job_id] = self.clock() + self.submit_grace_s
            return job, True

    def create_many(
        self, jobs: Sequence[tuple[str, JobRequest]], *, now: datetime | None = None
    ) -> list[StoredJob | None]:
        """Create ``queued`` jobs; None where that id already existed."""
        now = now or utcnow()
        out: list[StoredJob | None] = []
        for job_id, request in jobs:
            job, created = self.create_if_absent(job_id, request, now=now)
            out.append(job if created else None)
        return out

    def update(
        self, job: StoredJob, change: JobChange, *, now: datetime | None = None
    ) -> StoredJob | None:
        """Compare-and-set on ``version``; TransitionRefusedError as the Redis store. A
        check-only change (``is_check_only``) publishes no event, like ``check.lua``."""
        check_only = is_check_only(job, change)
        after = (
            apply_check(job, change)
            if check_only
            else apply_change(job, change, now=now or utcnow())
        )
        with self._lock:
            current = self.jobs.get(job.id)
            if current is None or current.version != job.version:
                return None
            if check_only:
                self.jobs[job.id] = after
                self.check_writes += 1
            else:
                self._write(after)
            self._move_due(after, change)
            return after

    def _move_due(self, after: StoredJob, change: JobChange) -> None:
        """update.lua's due-index rule, on the twin's clock."""
        if not expects_progress(after) or change.due_in is None:
            self.due_at.pop(after.id, None)
            return
        if isinstance(change.due_in, Unchanged):
            return
        due = self.clock() + max(0.0, change.due_in)
        if self.deadline_s and after.status in GENERATING:
            due = min(due, after.born_at + self.deadline_s)
        self.due_at[after.id] = due

    def _write(self, job: StoredJob) -> None:
        self.jobs[job.id] = job
        if job.status.is_terminal:
            self.ttls[job.id] = self.ttl_s
        self.events.append((job.id, job.status.value))

    def claim_idempotency_key(self, key: str, job_id: str, request: JobRequest) -> str:
        """Bind ``key`` to ``job_id`` and the request's hash; conflict on another request."""
        rhash = request_hash(request)
        with self._lock:
            held_id, held_hash = self.idempotency.setdefault(key, (job_id, rhash))
        if held_hash != rhash:
            raise IdempotencyConflictError(key, held_id)
        return held_id

    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump a service-wide counter."""
        with self._lock:
            self.counters[name] += amount

    def stats(self) -> dict[str, int]:
        """Service-wide counters."""
        with self._lock:
            return dict(self.counters)

    def in_flight(self) -> int:
        """How many jobs are not final."""
        with self._lock:
            return sum(1 for job in self.jobs.values() if not job.status.is_terminal)

    def now(self) -> float:
        """The twin's clock."""
        return self.clock()

    def due(self, now: float, limit: int) -> list[tuple[str, float]]:
        """Overdue jobs, most overdue first."""
        with self._lock:
            rows = sorted((at, job_id) for job_id, at in self.due_at.items() if at <= now)
        return [(job_id, at) for at, job_id in rows[:limit]]

    def due_count(self, now: float) -> int:
        """How many jobs are overdue."""
        with self._lock:
            return sum(1 for at in self.due_at.values() if at <= now)

    def set_due(self, job_id: str, at: float | None) -> None:
        """Move or drop a job's due time (never re-adds one)."""
        with self._lock:
            if at is None:
                self.due_at.pop(job_id, None)
            elif job_id in self.due_at:
                self.due_at[job_id] = at
