"""The Celery tasks. Thin: parse the message into its ``api_contracts.messages`` model, run
the step, return its outcome label.

Task names are part of the contract (api_contracts.messages). Tasks take ``*args, **kwargs``
so that a malformed message becomes a failed job with a reason instead of a TypeError.
Redis outages are retried with backoff (the only use of ``self.retry``); everything else is
decided by the steps (``worker.jobs.steps``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JOB_ID_PATTERN
from api_contracts.messages import (
    TASK_ARCHIVE,
    TASK_CANCEL,
    TASK_NOTIFY,
    TASK_POLL,
    TASK_SUBMIT,
    CancelMessage,
    StepMessage,
    SubmitMessage,
)
from worker import metrics
from worker.jobs.handoff import Handoff, Outcome, Publisher, StepResult
from worker.jobs.steps import StepContext
from worker.jobs.steps.archive import archive
from worker.jobs.steps.cancel import cancel
from worker.jobs.steps.notify import notify
from worker.jobs.steps.poll import poll
from worker.jobs.steps.submit import submit
from worker.queueing.publish import make_publisher
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.queueing.config import ServiceCelery

log = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

M = TypeVar("M", bound=BaseModel)

#: A task body: (context, delivery id, args, kwargs) -> what the step did.
TaskBody = Callable[[StepContext, str, tuple[Any, ...], dict[str, Any]], StepResult]


def step_context(rt: Runtime, publish: Publisher) -> StepContext:
    """The steps' context on this process's Runtime, publishing through ``publish``."""
    return StepContext(
        settings=rt.settings,
        store=rt.store,
        handoff=Handoff(rt.store, publish, max_countdown_s=rt.settings.max_countdown_s),
        services=rt,
    )


def job_id_from(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The job id a message names, if it names a plausible one."""
    candidate = args[0] if args else kwargs.get("job_id")
    if isinstance(candidate, str) and re.match(JOB_ID_PATTERN, candidate):
        return candidate
    return None


def _parse(
    model: type[M], names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> M:
    """Positional args by ``names``, then kwargs: every name is required (a message always
    carries them all); extra positionals are an error, extra keywords the model's."""
    if len(args) > len(names):
        raise ValueError("unexpected extra arguments")
    data = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in data:
            raise ValueError(f"{key} given twice")
        data[key] = value
    missing = [name for name in names if name not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return model.model_validate(data)


def _field_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def run_submit(
    ctx: StepContext, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> StepResult:
    """``runcomfy.submit(job_id, request, seq=0)``."""
    try:
        msg = _parse(SubmitMessage, ("job_id", "request"), args, kwargs)
    except ValidationError as exc:
        request_only = all(e["loc"] and e["loc"][0] == "request" for e in exc.errors())
        code = ErrorCode.INVALID_REQUEST if request_only else ErrorCode.MALFORMED_MESSAGE
        message = f"invalid submit message: {_field_errors(exc)}"
        return ctx.handoff.reject(job_id_from(args, kwargs), TASK_SUBMIT, code, message)
    except ValueError as exc:
        message = f"invalid submit message: {exc}"
        return ctx.handoff.reject(
            job_id_from(args, kwargs), TASK_SUBMIT, ErrorCode.MALFORMED_MESSAGE, message
        )
    return submit(ctx, msg, owner=task_id)


def _step_task(task: str, step: Callable[[StepContext, StepMessage], StepResult]) -> TaskBody:
    def run(
        ctx: StepContext, _id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepResult:
        try:
            msg = _parse(StepMessage, ("job_id", "seq"), args, kwargs)
        except (ValidationError, ValueError) as exc:
            return ctx.handoff.reject(
                job_id_from(args, kwargs),
                task,
                ErrorCode.MALFORMED_MESSAGE,
                f"malformed {task} message: {exc}",
            )
        return step(ctx, msg)

    return run


def run_cancel(
    ctx: StepContext, _id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> StepResult:
    """``runcomfy.cancel(job_id)``: a malformed one is counted and dropped (it fails no job)."""
    try:
        msg = _parse(CancelMessage, ("job_id",), args, kwargs)
    except (ValidationError, ValueError):
        metrics.MALFORMED_MESSAGES.labels(TASK_CANCEL).inc()
        log.error("malformed cancel message")
        return StepResult(Outcome.MALFORMED)
    return cancel(ctx, msg)


#: Contract task name -> its body.
TASKS: dict[str, TaskBody] = {
    TASK_SUBMIT: run_submit,
    TASK_POLL: _step_task(TASK_POLL, poll),
    TASK_ARCHIVE: _step_task(TASK_ARCHIVE, archive),
    TASK_NOTIFY: _step_task(TASK_NOTIFY, notify),
    TASK_CANCEL: run_cancel,
}


def register_tasks(app: ServiceCelery) -> None:
    """Register every task on ``app`` under its contract name."""
    for name, body in TASKS.items():
        _register(app, name, body)


def _register(app: ServiceCelery, name: str, body: TaskBody) -> None:
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
    def run_task(self: Any, *args: Any, **kwargs: Any) -> str:
        ctx = step_context(app.runtime, make_publisher(app))
        return body(ctx, str(self.request.id), args, kwargs).outcome.value
