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
from typing import TYPE_CHECKING, Any, Final, TypeVar

import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, ValidationError

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JOB_ID_PATTERN, JobError, JobStatus
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
from worker.errors import TransitionRefusedError
from worker.jobs import decisions
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

#: Broker or store unreachable: the task is retried as it is (Celery autoretry).
_REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KombuOperationalError,
)
#: Unexpected exceptions in a step are retried this often (backoff), then the job fails.
MAX_STEP_RETRIES: Final = 5
#: A step that lost its compare-and-set runs again this often (it re-reads the job and goes
#: on only if its message is still the current one).
LOST_RACE_RERUNS: Final = 2

M = TypeVar("M", bound=BaseModel)

#: A task body: (context, delivery id, args, kwargs) -> what the step did.
TaskBody = Callable[[StepContext, str, tuple[Any, ...], dict[str, Any]], StepResult]


def step_context(rt: Runtime, publish: Publisher) -> StepContext:
    """The steps' context on this process's Runtime, publishing through ``publish``."""
    return StepContext(
        settings=rt.settings,
        store=rt.store,
        handoff=Handoff(
            rt.store,
            publish,
            max_countdown_s=rt.settings.max_countdown_s,
            grace_s=rt.settings.reconcile.grace_s,
            admission=rt.admission,
        ),
        services=rt,
        unrecorded=rt.unrecorded_submits,
        runtimes=rt.runtimes,
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


def run_body(ctx: StepContext, name: str, task_id: str, args: Any, kwargs: Any) -> StepResult:
    """Run a task body; a step that lost a race runs again (submit settles its own races:
    running it again after its POST could post twice)."""
    result = TASKS[name](ctx, task_id, args, kwargs)
    reruns = 0 if name == TASK_SUBMIT else LOST_RACE_RERUNS
    for _ in range(reruns):
        if result.outcome != Outcome.LOST_RACE:
            break
        result = TASKS[name](ctx, task_id, args, kwargs)
    return result


def fail_after_errors(
    ctx: StepContext, name: str, job_id: str | None, exc: BaseException
) -> StepResult:
    """A step kept raising: fail its job with internal_error naming the exception class."""
    if job_id is None:
        return StepResult(Outcome.FAILED)
    job = ctx.store.get(job_id)
    if job is None or job.status.is_terminal:
        return StepResult(Outcome.FAILED, job_id)
    message = f"{name} kept raising {type(exc).__name__} ({MAX_STEP_RETRIES} retries)"
    error = JobError(code=ErrorCode.INTERNAL_ERROR, message=message)
    ctx.handoff.finish(job, JobStatus.FAILED, error)
    return StepResult(Outcome.FAILED, job_id)


def register_tasks(app: ServiceCelery) -> None:
    """Register every task on ``app`` under its contract name."""
    for name, body in TASKS.items():
        _register(app, name, body)


def _register(app: ServiceCelery, name: str, _body: TaskBody) -> None:
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
        try:
            return run_body(ctx, name, str(self.request.id), args, kwargs).outcome.value
        except _REDIS_ERRORS:
            raise  # autoretry_for: the same message again, later
        except TransitionRefusedError as exc:
            # The job moved on under this step: nothing to do; the store knows what is next.
            log.info("job moved on: %s", exc)
            return Outcome.STALE.value
        except Exception as exc:
            metrics.STEP_ERRORS.labels(name, type(exc).__name__).inc()
            retries = int(self.request.retries or 0)
            if retries < MAX_STEP_RETRIES:
                delay = decisions.backoff(retries + 1, ctx.rng.random())
                log.exception("%s raised; retry %d in %.1fs", name, retries + 1, delay)
                raise self.retry(exc=exc, countdown=delay, max_retries=MAX_STEP_RETRIES) from exc
            log.exception("%s kept raising; failing the job", name)
            return fail_after_errors(ctx, name, job_id_from(args, kwargs), exc).outcome.value
