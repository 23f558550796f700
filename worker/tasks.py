"""The four Celery tasks. Thin: parse nothing, call the Pipeline, log the outcome.

Task names are part of the contract (api_contracts.messages). Tasks take ``*args, **kwargs``
so that a malformed message becomes a failed job with a reason instead of a TypeError.
Redis outages are retried with backoff (the only use of ``self.retry``); everything else is
decided inside the Pipeline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis

from api_contracts.messages import (
    QUEUE_FOR_TASK,
    TASK_ARCHIVE,
    TASK_CANCEL,
    TASK_NOTIFY,
    TASK_POLL,
    TASK_SUBMIT,
)
from worker.pipeline import Pipeline

if TYPE_CHECKING:
    from worker.celery_app import ServiceCelery

log = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def make_pipeline(app: ServiceCelery) -> Pipeline:
    """A Pipeline on this process's runtime that publishes through ``app``."""

    def publish(task: str, args: list[Any], kwargs: dict[str, Any], countdown: float) -> None:
        app.send_task(
            task,
            args=args,
            kwargs=kwargs,
            queue=QUEUE_FOR_TASK[task],
            routing_key=QUEUE_FOR_TASK[task],
            countdown=countdown or None,
        )

    return Pipeline(app.runtime, publish)


def register_tasks(app: ServiceCelery) -> None:
    """Register submit/poll/archive/notify on ``app`` under their contract names."""

    @app.task(
        shared=False,
        name=TASK_SUBMIT,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def submit(self: Any, *args: Any, **kwargs: Any) -> str:
        owner = f"{self.request.id}"
        return make_pipeline(app).submit(args, kwargs, owner=owner).outcome

    @app.task(
        shared=False,
        name=TASK_POLL,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def poll(self: Any, *args: Any, **kwargs: Any) -> str:
        return make_pipeline(app).poll(args, kwargs).outcome

    @app.task(
        shared=False,
        name=TASK_ARCHIVE,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def archive(self: Any, *args: Any, **kwargs: Any) -> str:
        return make_pipeline(app).archive(args, kwargs).outcome

    @app.task(
        shared=False,
        name=TASK_NOTIFY,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def notify(self: Any, *args: Any, **kwargs: Any) -> str:
        return make_pipeline(app).notify(args, kwargs).outcome

    @app.task(
        shared=False,
        name=TASK_CANCEL,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def cancel(self: Any, *args: Any, **kwargs: Any) -> str:
        return make_pipeline(app).cancel_message(args, kwargs).outcome
