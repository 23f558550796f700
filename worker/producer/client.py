"""The Python client for producers: submit jobs, read them, wait for them, cancel them.

::

    from worker.producer.client import Client

    with Client.from_env() as client:  # REDIS_URL, ALLOW_PRIVATE_NETWORKS … from the env
        job = client.submit(
            prompt="a lighthouse at dusk, oil on canvas",
            size="2048x2048",
            webhook_url="https://example.com/hooks/runcomfy",
            idempotency_key="order-42",
        )
        done = client.wait(job.id, timeout=600, on_update=lambda r: print(r.status))
        print(done.status, [o.s3_uri for o in done.outputs])

A ``Client`` owns one Redis connection pool and one Celery producer pool and touches no
global state, so a single instance can be shared by every thread of a web server: build it
at start-up, ``close()`` it at shutdown (or use it as a context manager). Nothing connects
until the first call.

Errors: everything it raises is a :class:`~worker.errors.ServiceError` from the producer
branch of the tree drawn in :mod:`worker.errors`, re-exported here: InvalidRequestError,
IdempotencyConflictError, JobNotFoundError, RedisUnavailableError, WaitTimeoutError,
NotCancellableError, TryAgainError.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit, urlunsplit

import kombu.exceptions
import redis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError

from api_contracts.jobs import JobRecord, JobRequest, JobStatus
from api_contracts.messages import TASK_CANCEL
from worker.errors import (
    ConfigError,
    IdempotencyConflictError,
    InvalidRequestError,
    JobNotFoundError,
    NotCancellableError,
    RedisUnavailableError,
    TryAgainError,
    WaitTimeoutError,
)
from worker.jobs.cancel import cancel_queued
from worker.jobs.handoff import Handoff
from worker.jobs.store import events_channel
from worker.producer.producer import Producer
from worker.queueing.config import celery_config
from worker.queueing.publish import make_publisher, send_message
from worker.runtime import Runtime
from worker.settings import RedisSettings, Settings, load_settings

__all__ = [
    "Client",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "JobNotFoundError",
    "NotCancellableError",
    "RedisUnavailableError",
    "TryAgainError",
    "UpdateCallback",
    "WaitTimeoutError",
]

#: Without any event, a waiting client re-reads the record this often (seconds).
RECHECK_INTERVAL_S: Final = 1.0
#: How long ``cancel`` waits for the worker to cancel a job in upstream's queue (seconds).
DEFAULT_CANCEL_TIMEOUT_S: Final = 30.0

UpdateCallback = Callable[[JobRecord], None]

_REDIS_ERRORS: Final = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KombuOperationalError,
    # a batch of submit messages cut by a failover (kombu 5.7+): the records exist, so
    # retrying with the same idempotency keys is safe, and the reconciler resubmits any that
    # stay queued
    getattr(kombu.exceptions, "BatchPublishError", KombuOperationalError),
)


def _producer_app(settings: Settings) -> Celery:
    """A Celery app used only to send messages: no tasks, no signals, not the current app."""
    app = Celery("runcomfy_producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _fingerprint(record: JobRecord) -> tuple[Any, ...]:
    """What a progress display cares about: status, queue position, last change."""
    return (record.status, record.queue_position, record.updated_at)


class Client:
    """Submit, read, wait for and cancel jobs. Thread-safe; no global state.

    Build it with :meth:`from_env`, ``Client(redis_url=...)`` (other settings from the
    environment) or ``Client(settings=...)``.
    """

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        if settings is None:
            settings = load_settings(redis={"url": redis_url}) if redis_url else load_settings()
        elif redis_url is not None:
            try:
                redis_settings = RedisSettings(url=redis_url)
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"]
                raise ConfigError(f"invalid configuration: REDIS_URL: {reason}") from None
            settings = settings.model_copy(update={"redis": redis_settings})
        self.settings = settings
        self._runtime = Runtime(settings)
        # Built now, not lazily by the first of several threads (no connection is opened).
        self._runtime.store  # noqa: B018
        self._runtime.guard  # noqa: B018
        self._app = _producer_app(settings)
        self._producer = Producer(self._runtime, self._app)
        self._handoff = Handoff(
            self._runtime.store,
            make_publisher(self._app),
            max_countdown_s=settings.max_countdown_s,
            grace_s=settings.reconcile.grace_s,
            admission=self._runtime.admission,
        )

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from the environment (``REDIS_URL`` …); ConfigError if invalid."""
        return cls(settings=load_settings())

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the Redis and broker connections (safe to call twice)."""
        self._app.close()
        self._runtime.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ producing
    def submit(
        self,
        request: JobRequest | Mapping[str, Any] | None = None,
        /,
        *,
        prompt: str | None = None,
        size: str | None = None,
        scale: float | None = None,
        force_single: bool | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        tenant: str | None = None,
        priority: str | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """Validate and queue one job; returns its record (``queued``, or the existing job
        when ``idempotency_key`` was used before with the same request).

        Pass a :class:`JobRequest` (or its JSON as a mapping), or keyword arguments; omitted
        fields take the model's defaults (size 2048x2048, scale 0.5, force_single False).
        Raises InvalidRequestError, naming each bad field, before anything is queued.
        """
        generation = {"prompt": prompt, "size": size, "scale": scale, "force_single": force_single}
        extras = {
            "webhook_url": webhook_url,
            "idempotency_key": idempotency_key,
            "metadata": dict(metadata) if metadata is not None else None,
            "tenant": tenant,
            "priority": priority,
        }
        fields = {k: v for k, v in extras.items() if v is not None}
        data: JobRequest | dict[str, Any]
        if request is not None:
            if fields or any(v is not None for v in generation.values()):
                raise TypeError("pass a request or keyword fields, not both")
            data = request if isinstance(request, JobRequest) else dict(request)
        else:
            data = {"input": {k: v for k, v in generation.items() if v is not None}, **fields}
        with self._redis_errors():
            return self._producer.enqueue(data, job_id=job_id)

    def submit_many(self, requests: Iterable[JobRequest | Mapping[str, Any]]) -> list[JobRecord]:
        """Validate and queue many jobs at once (records in one pipeline, messages in one
        batch); returns their records in order. If any request is invalid, nothing is queued
        and InvalidRequestError names each bad field as ``[index].field``."""
        data = [r if isinstance(r, JobRequest) else dict(r) for r in requests]
        with self._redis_errors():
            return self._producer.enqueue_many(data)

    # ------------------------------------------------------------------ reading
    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFoundError when unknown or expired."""
        with self._redis_errors():
            return self._producer.get(job_id)

    def watch(
        self, job_id: str, *, timeout: float | None = None
    ) -> Generator[JobRecord, None, None]:
        """Yield the record now, then again after every change event (and at least once a
        second), until it is final (the last one yielded). Subscribes to the job's pub/sub
        channel, so waiting costs one idle connection, not a stream of reads.

        WaitTimeoutError when not final after ``timeout`` seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._redis_errors():
            pubsub = self._runtime.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            with self._redis_errors():
                # Subscribe before the first read: no change can fall between the two.
                pubsub.subscribe(events_channel(job_id))
                record = self._producer.get(job_id)
            yield record
            while not record.status.is_terminal:
                pause = RECHECK_INTERVAL_S
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeoutError(
                            f"job {job_id} still {record.status.value} after {timeout:g}s",
                            record,
                        )
                    pause = min(pause, remaining)
                with self._redis_errors():
                    if pubsub.get_message(timeout=pause) is not None:
                        while pubsub.get_message(timeout=0.0) is not None:
                            pass  # a burst of changes: one read covers them all
                    record = self._producer.get(job_id)
                yield record
        finally:
            with suppress(*_REDIS_ERRORS):
                pubsub.close()

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: UpdateCallback | None = None,
    ) -> JobRecord:
        """Block until the job is final and return its record. ``on_update`` is called with
        the record first and then whenever its status, queue position or content changes.

        WaitTimeoutError after ``timeout`` seconds (None: no limit; the service's own
        deadline, JOB_DEADLINE_S, ends every job eventually).
        """
        last: tuple[Any, ...] | None = None
        record: JobRecord | None = None
        with closing(self.watch(job_id, timeout=timeout)) as updates:
            for record in updates:
                if on_update is not None and _fingerprint(record) != last:
                    last = _fingerprint(record)
                    on_update(record)
        assert record is not None  # watch yields at least once or raises
        return record

    # ------------------------------------------------------------------ cancelling
    def cancel(self, job_id: str, *, timeout: float = DEFAULT_CANCEL_TIMEOUT_S) -> JobRecord:
        """Cancel a job and return its record.

        * ``queued`` (not yet sent upstream): cancelled here, at once; upstream never sees it
          and the ``job.cancelled`` webhook is sent by a worker.
        * ``in_queue`` (waiting in upstream's queue): a worker is asked to cancel it upstream
          (``runcomfy.cancel``); waits up to ``timeout`` s for ``cancelled``. If upstream
          starts it first: NotCancellableError; no answer in time: WaitTimeoutError.
        * ``submitting``: TryAgainError (it is being sent upstream right now).
        * ``in_progress``/``archiving``: NotCancellableError (upstream cannot cancel those).
        * final states: the record, unchanged (check ``status``).
        """
        for _ in range(5):
            record = self.get(job_id)
            status = record.status
            if status.is_terminal:
                return record
            if status == JobStatus.QUEUED:
                with self._redis_errors():
                    done = cancel_queued(self._handoff, job_id)
                if done is not None:
                    return done.record
                continue  # a worker picked it up meanwhile: look again
            if status == JobStatus.IN_QUEUE:
                outcome = self._cancel_in_upstream_queue(job_id, timeout)
                if outcome is not None:
                    return outcome
                continue
            if status == JobStatus.SUBMITTING:
                raise TryAgainError(
                    f"job {job_id} is being submitted upstream right now; try again in a moment"
                )
            raise NotCancellableError.for_job(job_id, status)
        raise TryAgainError(f"job {job_id} kept changing while cancelling; try again in a moment")

    def _cancel_in_upstream_queue(self, job_id: str, timeout: float) -> JobRecord | None:
        """Ask a worker to cancel upstream and wait for the outcome; None: look again."""
        updates = self.watch(job_id, timeout=timeout)
        with closing(updates):
            record = next(updates)
            if record.status != JobStatus.IN_QUEUE:
                return None
            with self._redis_errors():
                send_message(self._app, TASK_CANCEL, [job_id])
            try:
                for record in updates:
                    if record.status.is_terminal:
                        return record
                    if record.status in (JobStatus.IN_PROGRESS, JobStatus.ARCHIVING):
                        raise NotCancellableError.for_job(job_id, record.status)
            except WaitTimeoutError as exc:
                raise WaitTimeoutError(
                    f"cancel of job {job_id} requested, but it is still "
                    f"{exc.record.status.value} after {timeout:g}s (upstream may have started "
                    "it, or no worker consumes runcomfy.submit); check its status later",
                    exc.record,
                ) from None
        return record

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _redis_errors(self) -> Iterator[None]:
        try:
            yield
        except _REDIS_ERRORS as exc:
            raise RedisUnavailableError(
                f"cannot reach Redis at {_safe_url(self.settings.redis.url)}: {exc}"
            ) from exc
