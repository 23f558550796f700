"""The Celery tasks. Thin: hand the raw message to the Pipeline, return its outcome label.

Task names are part of the contract (api_contracts.messages). Tasks take ``*args, **kwargs``
so that a malformed message becomes a failed job with a reason instead of a TypeError.
Redis outages are retried with backoff (the only use of ``self.retry``); everything else is
decided inside the Pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from api_contracts.messages import (
    TASK_ARCHIVE,
    TASK_CANCEL,
    TASK_NOTIFY,
    TASK_POLL,
    TASK_SUBMIT,
)
from worker.messaging import send_message
from worker.pipeline import Pipeline, Publisher, StepResult

if TYPE_CHECKING:
    from worker.celery_app import ServiceCelery

log = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

Step = Callable[[Pipeline, str, tuple[Any, ...], dict[str, Any]], StepResult]

#: Contract task name -> the Pipeline step it runs (the str is the delivery's task id).
STEPS: dict[str, Step] = {
    TASK_SUBMIT: lambda p, task_id, a, k: p.submit(a, k, owner=task_id),
    TASK_POLL: lambda p, _id, a, k: p.poll(a, k),
    TASK_ARCHIVE: lambda p, _id, a, k: p.archive(a, k),
    TASK_NOTIFY: lambda p, _id, a, k: p.notify(a, k),
    TASK_CANCEL: lambda p, _id, a, k: p.cancel_message(a, k),
}


def make_publisher(app: Celery) -> Publisher:
    """A Publisher that sends through ``app`` onto the task's contract queue."""

    def publish(task: str, args: list[Any], kwargs: dict[str, Any], countdown: float) -> None:
        send_message(app, task, args, kwargs, countdown=countdown)

    return publish


def register_tasks(app: ServiceCelery) -> None:
    """Register every step on ``app`` under its contract name."""
    for name, step in STEPS.items():
        _register(app, name, step)


def _register(app: ServiceCelery, name: str, step: Step) -> None:
    @app.task(
        shared=False,
        name=name,
        bind=True,
        autoretry_for=_REDIS_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=30,
    )
    def run_step(self: Any, *args: Any, **kwargs: Any) -> str:
        pipeline = Pipeline(app.runtime, make_publisher(app))
        return step(pipeline, str(self.request.id), args, kwargs).outcome
