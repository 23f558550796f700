"""An in-memory :class:`~worker.jobs.store.JobStore` for unit tests of the steps.

Same contract as the Redis store (compare-and-set on ``version``, the same
:func:`~worker.jobs.state.apply_change`, idempotency keys, counters), kept in dicts under a
lock. It also records what the Redis store would do beside the write, so tests can assert
on it: which jobs got a TTL (final ones) and every published event.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from api_contracts.jobs import JobError, JobRequest, JobStatus
from worker.errors import IdempotencyConflictError, JobNotFoundError
from worker.jobs.state import JobChange, StoredJob, apply_change, new_job, request_hash, utcnow


class InMemoryJobStore:
    """:class:`~worker.jobs.store.JobStore` in process memory. Thread-safe."""

    def __init__(self, *, ttl_s: int = 7 * 24 * 3600) -> None:
        self.ttl_s = ttl_s
        self.jobs: dict[str, StoredJob] = {}
        #: job id -> TTL given to it (set when a job becomes final, as Redis EXPIRE would)
        self.ttls: dict[str, int] = {}
        #: (job id, status) for every write, as published on the events channel
        self.events: list[tuple[str, str]] = []
        self.idempotency: dict[str, str] = {}
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> StoredJob | None:
        """The job, or None when unknown."""
        with self._lock:
            return self.jobs.get(job_id)

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
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                return existing, False
            self._write(job)
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
        """Compare-and-set on ``version``; TransitionRefusedError as the Redis store."""
        after = apply_change(job, change, now=now or utcnow())
        with self._lock:
            current = self.jobs.get(job.id)
            if current is None or current.version != job.version:
                return None
            self._write(after)
            return after

    def _write(self, job: StoredJob) -> None:
        self.jobs[job.id] = job
        if job.status.is_terminal:
            self.ttls[job.id] = self.ttl_s
        self.events.append((job.id, job.status.value))

    def claim_idempotency_key(self, key: str, job_id: str, request: JobRequest) -> str:
        """Bind ``key`` to ``job_id``, or name the earlier job; conflict on another request."""
        with self._lock:
            existing_id = self.idempotency.setdefault(key, job_id)
            existing = self.jobs.get(existing_id)
        if existing_id == job_id:
            return job_id
        if existing is not None and existing.rhash and existing.rhash != request_hash(request):
            raise IdempotencyConflictError(key, existing_id)
        return existing_id

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
