"""The four steps of a job as plain functions: submit → poll … → archive → notify.

Celery tasks (worker/tasks.py) only parse nothing and call these; everything here talks to
the job store, RunComfy, S3 and webhooks through the Runtime, and hands off to the next
step through a ``Publisher`` (Celery's ``send_task`` in production).

At-least-once delivery is assumed everywhere:

* every hand-off is a compare-and-set that bumps the job's ``seq`` and records the promised
  message in ``outbox`` *before* publishing it; a message whose ``seq`` is not the stored one
  is stale and returns at once, so duplicates never fork a chain;
* if a worker dies between that write and the publish, its own message is redelivered
  (acks_late) with the previous seq, finds the outbox overdue, and republishes it;
* submit POSTs upstream only from ``queued`` (or after a lease expired: the ambiguous
  window, counted and noted on the job); once ``request_id`` is stored it never POSTs again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from pydantic import ValidationError

from api_contracts.errors import ErrorCode
from api_contracts.jobs import (
    EVENT_FOR_STATUS,
    JOB_ID_PATTERN,
    ArchivedOutput,
    JobError,
    JobStatus,
    OutputKind,
    WebhookDelivery,
    WebhookEvent,
    WebhookState,
)
from api_contracts.messages import (
    TASK_ARCHIVE,
    TASK_CANCEL,
    TASK_NOTIFY,
    TASK_POLL,
    TASK_SUBMIT,
    StepMessage,
    SubmitMessage,
)
from api_contracts.upstream import StatusResponse
from worker import decisions, metrics
from worker.errors import (
    NotCancellableError,
    ServiceError,
    TransitionRefusedError,
    UpstreamError,
)
from worker.logs import log_context
from worker.runtime import Runtime
from worker.store import Outbox, StoredJob

log = logging.getLogger(__name__)

#: How long past its due time a promised message may be missing before it is republished.
OUTBOX_GRACE_S: Final = 30.0
#: How long a submit holds its lease while talking to upstream (beyond the HTTP timeouts).
LEASE_MARGIN_S: Final = 15.0


class Publisher(Protocol):
    """Sends one task message: name, positional args, kwargs, countdown in seconds."""

    def __call__(
        self, task: str, args: list[Any], kwargs: dict[str, Any], countdown: float
    ) -> None: ...


@dataclass(frozen=True)
class StepResult:
    """What a step did, for logs and tests: ``outcome`` is a short label."""

    outcome: str
    job_id: str | None = None


class Pipeline:
    """The job steps, bound to one Runtime and one Publisher."""

    def __init__(
        self,
        rt: Runtime,
        publish: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.rt = rt
        self.publish = publish
        self.clock = clock
        self.rng = rng or random.Random()

    # ================================================================== submit
    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, owner: str) -> StepResult:
        """``runcomfy.submit(job_id, request, seq=0)``: create if absent, POST once, then poll."""
        job_id = _job_id_from(args, kwargs)
        seq = kwargs.get("seq", 0)
        try:
            msg = SubmitMessage.model_validate(
                {
                    "job_id": job_id,
                    "request": args[1] if len(args) > 1 else kwargs.get("request"),
                    "seq": seq,
                }
            )
        except ValidationError as exc:
            return self._reject_invalid_submit(job_id, exc, args, kwargs)
        with log_context(job_id=msg.job_id, task=TASK_SUBMIT):
            # Producers normally created the record already: read first, create only if absent.
            found = self.rt.store.get(msg.job_id)
            if found is None:
                job, created = self.rt.store.create_if_absent(msg.job_id, msg.request)
                if created:
                    log.info("job created by its submit message")
            else:
                job = found
            if not self._current(job, msg.seq, TASK_SUBMIT):
                return StepResult("stale", msg.job_id)
            if job.status.is_terminal or job.record.request_id:
                return StepResult("already_submitted", msg.job_id)
            now = self.clock()
            ambiguous = False
            if job.status == JobStatus.SUBMITTING and job.lease_owner:
                if job.lease_owner != owner and job.lease_until > now:
                    return StepResult("submit_in_progress_elsewhere", msg.job_id)
                ambiguous = True
            return self._do_submit(job, owner=owner, ambiguous=ambiguous)

    def _do_submit(self, job: StoredJob, *, owner: str, ambiguous: bool) -> StepResult:
        rc = self.rt.settings.runcomfy
        now = self.clock()
        lease_until = now + rc.connect_timeout_s + rc.read_timeout_s + LEASE_MARGIN_S
        notes = list(job.record.notes)
        if ambiguous:
            # Killed between POST and recording its answer: upstream may hold a request we
            # never saw. Submitting again may cost a second generation; not submitting may
            # lose the job. We submit again (at-least-once) and say so on the job.
            metrics.AMBIGUOUS_SUBMITS.inc()
            self.rt.store.incr_stat("ambiguous_submits")
            notes.append(
                f"ambiguous_submit: a previous submit attempt may have reached upstream "
                f"before the worker stopped ({_iso(now)}); submitted again"
            )
            log.warning("ambiguous submit window: submitting again")
        claimed = self.rt.store.update(
            job,
            status=JobStatus.SUBMITTING,
            lease=(owner, lease_until),
            notes=notes,
        )
        if claimed is None:
            return StepResult("lost_race", job.id)
        request = claimed.record.request
        assert request is not None  # a job with a parsed request is the only kind we submit
        try:
            answer = self.rt.runcomfy.submit(request.input)
        except ServiceError as exc:
            metrics.UPSTREAM_CALLS.labels("submit", _outcome(exc)).inc()
            return self._submit_failed(claimed, exc)
        metrics.UPSTREAM_CALLS.labels("submit", "ok").inc()
        submitted_at = datetime.now(UTC)
        metrics.STAGE_SECONDS.labels("queued").observe(
            (submitted_at - claimed.record.created_at).total_seconds()
        )
        with log_context(request_id=answer.request_id):
            after = self._handoff(
                claimed,
                TASK_POLL,
                countdown=self.rt.settings.poll.initial_delay_s,
                status=JobStatus.IN_QUEUE,
                request_id=answer.request_id,
                submitted_at=submitted_at,
                lease=None,
                attempt=0,
                since=0.0,
            )
            log.info("submitted upstream")
        return StepResult("submitted" if after else "lost_race", job.id)

    def _submit_failed(self, job: StoredJob, exc: ServiceError) -> StepResult:
        attempt = job.attempt + 1
        decision = decisions.decide_submit_error(
            exc,
            attempt=attempt,
            age_s=self._age(job),
            deadline_s=self.rt.settings.job.deadline_s,
            jitter=self.rng.random(),
        )
        if isinstance(decision, decisions.Fail):
            log.warning("submit failed: %s", decision.message)
            self._finish(
                job,
                JobStatus.FAILED,
                JobError(code=decision.code, message=decision.message),
                lease=None,
            )
            return StepResult("failed", job.id)
        log.info("submit will retry in %.1fs: %s", decision.countdown, exc)
        self._handoff(job, TASK_SUBMIT, countdown=decision.countdown, lease=None, attempt=attempt)
        return StepResult("retry", job.id)

    def _reject_invalid_submit(
        self,
        job_id: str | None,
        exc: ValidationError,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> StepResult:
        """A submit whose request does not validate: the job fails with the field errors."""
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        is_request_error = all(e["loc"] and e["loc"][0] == "request" for e in exc.errors())
        code = ErrorCode.INVALID_REQUEST if is_request_error else ErrorCode.MALFORMED_MESSAGE
        return self._fail_unparseable(
            job_id, TASK_SUBMIT, code, f"invalid submit message: {fields}"
        )

    # ================================================================== poll
    def poll(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepResult:
        """``runcomfy.poll(job_id, seq)``: one status check, then reschedule or move on."""
        opened = self._open_step(TASK_POLL, args, kwargs)
        if isinstance(opened, StepResult):
            return opened
        job = opened
        with log_context(job_id=job.id, task=TASK_POLL):
            if job.status not in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS):
                return StepResult("not_polling", job.id)
            request_id = job.record.request_id or ""
            with log_context(request_id=request_id, attempt=job.attempt):
                answer: StatusResponse | ServiceError
                try:
                    answer = self.rt.runcomfy.status(request_id)
                    metrics.UPSTREAM_CALLS.labels("status", "ok").inc()
                except UpstreamError as exc:
                    metrics.UPSTREAM_CALLS.labels("status", _outcome(exc)).inc()
                    answer = exc
                return self._act_on_poll(job, answer)

    def _act_on_poll(self, job: StoredJob, answer: StatusResponse | ServiceError) -> StepResult:
        calls = job.record.status_calls + 1
        submitted = job.record.submitted_at or job.record.created_at
        elapsed = (datetime.now(UTC) - submitted).total_seconds()
        error_streak = job.attempt
        decision = decisions.decide_poll(
            status=job.status,
            answer=answer,
            elapsed_s=elapsed,
            age_s=self._age(job),
            deadline_s=self.rt.settings.job.deadline_s,
            error_streak=error_streak,
            poll=self.rt.settings.poll,
            jitter=self.rng.random(),
        )
        if isinstance(decision, decisions.Reschedule):
            changes: dict[str, Any] = {"status_calls": calls}
            if decision.status is not None:
                changes["status"] = decision.status
                changes["queue_position"] = decision.queue_position
                if decision.status == JobStatus.IN_PROGRESS and job.status == JobStatus.IN_QUEUE:
                    metrics.STAGE_SECONDS.labels("upstream_queue").observe(elapsed)
            attempt = 0 if isinstance(answer, StatusResponse) else error_streak + 1
            after = self._handoff(
                job, TASK_POLL, countdown=decision.countdown, attempt=attempt, **changes
            )
            return StepResult("rescheduled" if after else "lost_race", job.id)
        metrics.STATUS_CALLS_PER_JOB.observe(calls)
        if isinstance(decision, decisions.FetchResult):
            metrics.STAGE_SECONDS.labels("generation").observe(elapsed)
            after = self._handoff(
                job,
                TASK_ARCHIVE,
                countdown=0,
                status=JobStatus.ARCHIVING,
                status_calls=calls,
                queue_position=None,
                attempt=0,
                since=0.0,
            )
            return StepResult("completed" if after else "lost_race", job.id)
        if isinstance(decision, decisions.MarkCancelled):
            error = JobError(code=ErrorCode.UPSTREAM_CANCELLED, message=decision.message)
            self._finish(job, JobStatus.CANCELLED, error, status_calls=calls, queue_position=None)
            return StepResult("cancelled", job.id)
        if isinstance(decision, decisions.CancelUpstreamAndFail):
            self._cancel_upstream_quietly(job)
        error = JobError(code=decision.code, message=decision.message)
        self._finish(job, JobStatus.FAILED, error, status_calls=calls, queue_position=None)
        return StepResult("failed", job.id)

    def _cancel_upstream_quietly(self, job: StoredJob) -> None:
        try:
            self.rt.runcomfy.cancel(job.record.request_id or "")
            metrics.UPSTREAM_CALLS.labels("cancel", "ok").inc()
        except ServiceError as exc:  # best effort: the job fails either way
            metrics.UPSTREAM_CALLS.labels("cancel", _outcome(exc)).inc()
            log.warning("could not cancel upstream request past the deadline: %s", exc)

    # ================================================================== archive
    def archive(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepResult:
        """``runcomfy.archive(job_id, seq)``: fetch the result, stream every output into S3."""
        opened = self._open_step(TASK_ARCHIVE, args, kwargs)
        if isinstance(opened, StepResult):
            return opened
        job = opened
        with log_context(job_id=job.id, task=TASK_ARCHIVE):
            if job.status != JobStatus.ARCHIVING:
                return StepResult("not_archiving", job.id)
            with log_context(request_id=job.record.request_id, attempt=job.attempt):
                started = time.monotonic()
                try:
                    outputs = self._archive_outputs(job)
                except ServiceError as exc:
                    return self._archive_failed(job, exc)
                metrics.STAGE_SECONDS.labels("archive").observe(time.monotonic() - started)
                if not outputs:
                    error = JobError(
                        code=ErrorCode.NO_OUTPUTS, message="upstream returned no outputs"
                    )
                    self._finish(job, JobStatus.FAILED, error)
                    return StepResult("failed", job.id)
                self._finish(job, JobStatus.SUCCEEDED, None, outputs=outputs, attempt=0, since=0.0)
                log.info("archived %d output(s)", len(outputs))
                return StepResult("succeeded", job.id)

    def _archive_outputs(self, job: StoredJob) -> list[ArchivedOutput]:
        request_id = job.record.request_id or ""
        try:
            result = self.rt.runcomfy.result(request_id)
            metrics.UPSTREAM_CALLS.labels("result", "ok").inc()
        except UpstreamError as exc:
            metrics.UPSTREAM_CALLS.labels("result", _outcome(exc)).inc()
            raise
        if result.output is None:
            from worker.errors import RetryableUpstreamError

            if result.status == "failed":
                raise _GenerationFailed(decisions._upstream_error_text(result.error))
            raise RetryableUpstreamError(f"result not ready yet (status {result.status})")
        outputs = []
        for index, (kind, url) in enumerate(result.output.media()):
            try:
                archived = self.rt.archiver.archive_one(
                    job_id=job.id,
                    request_id=request_id,
                    index=index,
                    kind=OutputKind(kind),
                    source_url=url,
                )
                metrics.UPSTREAM_CALLS.labels("download", "ok").inc()
            except ServiceError as exc:
                metrics.UPSTREAM_CALLS.labels("download", _outcome(exc)).inc()
                raise
            outputs.append(archived)
        return outputs

    def _archive_failed(self, job: StoredJob, exc: ServiceError) -> StepResult:
        if isinstance(exc, _GenerationFailed):
            error = JobError(code=ErrorCode.GENERATION_FAILED, message=str(exc))
            self._finish(job, JobStatus.FAILED, error)
            return StepResult("failed", job.id)
        now = self.clock()
        since = job.since or now
        attempt = job.attempt + 1
        decision = decisions.decide_archive_error(
            exc,
            attempt=attempt,
            failing_for_s=now - since,
            storage_window_s=self.rt.settings.s3.retry_window_s,
            jitter=self.rng.random(),
        )
        if isinstance(decision, decisions.Fail):
            log.warning("archive failed: %s", decision.message)
            self._finish(
                job, JobStatus.FAILED, JobError(code=decision.code, message=decision.message)
            )
            return StepResult("failed", job.id)
        log.info("archive will retry in %.1fs: %s", decision.countdown, exc)
        self._handoff(job, TASK_ARCHIVE, countdown=decision.countdown, attempt=attempt, since=since)
        return StepResult("retry", job.id)

    # ================================================================== notify
    def notify(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepResult:
        """``runcomfy.notify(job_id, seq)``: one signed delivery attempt of the final event."""
        opened = self._open_step(TASK_NOTIFY, args, kwargs)
        if isinstance(opened, StepResult):
            return opened
        job = opened
        with log_context(job_id=job.id, task=TASK_NOTIFY):
            record = job.record
            info = record.webhook
            if (
                not job.status.is_terminal
                or info is None
                or info.state != WebhookState.PENDING
                or record.request is None
                or not record.request.webhook_url
            ):
                return StepResult("nothing_to_send", job.id)
            body = event_body(job)
            attempt = len(info.deliveries) + 1
            with log_context(attempt=attempt):
                result = self.rt.webhooks.deliver(
                    record.request.webhook_url, info.id, body, timestamp=int(self.clock())
                )
            metrics.WEBHOOK_ATTEMPTS.labels(result.outcome).inc()
            delivery = WebhookDelivery(
                attempt=attempt,
                at=datetime.now(UTC),
                status_code=result.status_code,
                error=(
                    f"webhook_target_forbidden: {result.error}"
                    if result.outcome == "forbidden"
                    else result.error
                ),
                duration_ms=result.duration_ms,
            )
            deliveries = [*info.deliveries, delivery]
            if result.outcome == "retry":
                from worker.webhooks import next_retry_delay

                delay = next_retry_delay(self.rt.settings.webhook.retry_schedule, attempt)
                if delay is not None:
                    new_info = info.model_copy(update={"deliveries": deliveries})
                    self._handoff(job, TASK_NOTIFY, countdown=delay, webhook=new_info)
                    log.info("webhook attempt %d failed; next in %.0fs", attempt, delay)
                    return StepResult("retry", job.id)
            state = WebhookState.DELIVERED if result.outcome == "delivered" else WebhookState.FAILED
            if state == WebhookState.DELIVERED and record.finished_at is not None:
                metrics.STAGE_SECONDS.labels("webhook").observe(
                    (datetime.now(UTC) - record.finished_at).total_seconds()
                )
            new_info = info.model_copy(update={"deliveries": deliveries, "state": state})
            self.rt.store.update(job, seq=job.seq + 1, outbox=None, webhook=new_info)
            log.info("webhook %s after %d attempt(s)", state.value, attempt)
            return StepResult(f"webhook_{state.value}", job.id)

    # ================================================================== cancel
    def cancel(self, job_id: str) -> StoredJob:
        """Cancel a job: before submit locally; in upstream's queue there; else refuse."""
        with log_context(job_id=job_id, task="cancel"):
            for _ in range(5):
                job = self.rt.store.load(job_id)
                if job.status.is_terminal:
                    return job
                if job.status == JobStatus.QUEUED:
                    error = JobError(
                        code=ErrorCode.CANCELLED, message="cancelled before submission"
                    )
                    done = self._finish(job, JobStatus.CANCELLED, error)
                    if done is not None:
                        return done
                    continue
                if job.status == JobStatus.IN_QUEUE and job.record.request_id:
                    self.rt.runcomfy.cancel(job.record.request_id)  # NotCancellableError propagates
                    metrics.UPSTREAM_CALLS.labels("cancel", "ok").inc()
                    for _ in range(5):
                        job = self.rt.store.load(job_id)
                        if job.status.is_terminal:
                            return job
                        error = JobError(
                            code=ErrorCode.CANCELLED, message="cancelled by the producer"
                        )
                        done = self._finish(job, JobStatus.CANCELLED, error, queue_position=None)
                        if done is not None:
                            return done
                    raise TransitionRefusedError(f"job {job_id} kept changing; try again")
                raise NotCancellableError(
                    f"job {job_id} is {job.status.value}: upstream cannot cancel running work",
                    status_code=409,
                )
            raise TransitionRefusedError(f"job {job_id} kept changing; try again")

    def cancel_message(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepResult:
        """``runcomfy.cancel(job_id)``: a producer asked to cancel; the outcome is the record."""
        job_id = _job_id_from(args, kwargs)
        if job_id is None or len(args) > 1 or set(kwargs) - {"job_id"}:
            metrics.MALFORMED_MESSAGES.labels(TASK_CANCEL).inc()
            log.error("malformed cancel message")
            return StepResult("malformed")
        try:
            job = self.cancel(job_id)
        except NotCancellableError as exc:
            log.info("cancel refused: %s", exc)
            self._refresh_after_refused_cancel(job_id)
            return StepResult("not_cancellable", job_id)
        except ServiceError as exc:
            log.warning("cancel failed: %s", exc)
            return StepResult("cancel_failed", job_id)
        return StepResult(job.status.value, job_id)

    def _refresh_after_refused_cancel(self, job_id: str) -> None:
        """Upstream refused to cancel: it has started. Record that now, so the producer waiting
        on the record learns it at once instead of at the next scheduled status check."""
        job = self.rt.store.get(job_id)
        if job is None or job.status != JobStatus.IN_QUEUE or not job.record.request_id:
            return
        try:
            answer = self.rt.runcomfy.status(job.record.request_id)
        except ServiceError:
            return  # the poll chain will catch up
        if answer.status == "in_progress":
            # status only: seq and outbox stay, so the poll chain carries on untouched
            self.rt.store.update(job, status=JobStatus.IN_PROGRESS, queue_position=None)

    # ================================================================== shared machinery
    def _handoff(
        self, job: StoredJob, task: str, *, countdown: float, **changes: Any
    ) -> StoredJob | None:
        """CAS the job to seq+1 with ``task`` promised in the outbox, then publish it."""
        seq = job.seq + 1
        countdown = max(0.0, countdown)
        outbox = Outbox(task=task, seq=seq, due_at=self.clock() + countdown)
        after = self.rt.store.update(job, seq=seq, outbox=outbox, **changes)
        if after is None:
            metrics.STALE_MESSAGES.labels(task).inc()
            log.info("job changed under us; %s not sent", task)
            return None
        self._send(task, job.id, seq, countdown)
        return after

    def _finish(
        self, job: StoredJob, status: JobStatus, error: JobError | None, **changes: Any
    ) -> StoredJob | None:
        """Move to a final state; hand off to notify when there is a webhook to send."""
        has_webhook = job.record.webhook is not None
        if has_webhook:
            after = self._handoff(
                job, TASK_NOTIFY, countdown=0, status=status, error=error, **changes
            )
        else:
            after = self.rt.store.update(
                job, status=status, error=error, seq=job.seq + 1, outbox=None, **changes
            )
        if after is not None:
            metrics.JOBS_FINISHED.labels(status.value).inc()
            if error is not None:
                metrics.JOB_ERRORS.labels(error.code).inc()
            log.info("job %s%s", status.value, f" ({error.code}: {error.message})" if error else "")
        return after

    def _send(self, task: str, job_id: str, seq: int, countdown: float, **kwargs: Any) -> None:
        """Publish, splitting waits longer than the broker allows into hops (``not_before``)."""
        limit = self.rt.settings.max_countdown_s
        if countdown > limit:
            kwargs["not_before"] = self.clock() + countdown
            countdown = limit
        if task == TASK_SUBMIT:
            job = self.rt.store.load(job_id)
            request = job.record.request
            assert request is not None
            payload = request.model_dump(mode="json", by_alias=True)
            self.publish(task, [job_id, payload], {"seq": seq, **kwargs}, countdown)
        else:
            self.publish(task, [job_id, seq], kwargs, countdown)

    def _current(self, job: StoredJob, seq: int, task: str) -> bool:
        """Is this message the one the job expects? Otherwise it is stale: but if it is the
        message just before a hand-off whose promised message never ran, republish that."""
        if job.seq == seq:
            return True
        outbox = job.outbox
        if outbox is not None and outbox.seq == job.seq and seq == job.seq - 1:
            # The message just before a hand-off: a duplicate, or a redelivery after its
            # worker died between the hand-off's write and its publish.
            overdue_in = outbox.due_at + OUTBOX_GRACE_S - self.clock()
            if overdue_in <= 0:
                log.warning(
                    "republishing %s seq %d: it was promised but never ran", outbox.task, outbox.seq
                )
                self._send(outbox.task, job.id, outbox.seq, 0.0)
            else:
                # Too early to tell: look again once the promised message is overdue.
                self._send(task, job.id, seq, overdue_in + 1.0)
            return False
        metrics.STALE_MESSAGES.labels(task).inc()
        log.info("stale %s message (seq %d, job at %d); ignored", task, seq, job.seq)
        return False

    def _open_step(
        self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StoredJob | StepResult:
        """Parse a poll/archive/notify message and load its job, if this message is current."""
        msg = self._step_message(task, args, kwargs)
        if isinstance(msg, StepResult):
            return msg
        with log_context(job_id=msg.job_id, task=task):
            job = self.rt.store.get(msg.job_id)
            if job is None or not self._current(job, msg.seq, task):
                return StepResult("stale", msg.job_id)
        return job

    def _step_message(
        self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepMessage | StepResult:
        """Parse a poll/archive/notify message; hop if it is not due yet; reject garbage."""
        job_id = _job_id_from(args, kwargs)
        not_before = kwargs.get("not_before")
        try:
            msg = StepMessage.model_validate(
                {"job_id": job_id, "seq": args[1] if len(args) > 1 else kwargs.get("seq")}
            )
            if len(args) > 2 or set(kwargs) - {"job_id", "seq", "not_before"}:
                raise ValueError("unexpected extra arguments")
            if not_before is not None and not isinstance(not_before, int | float):
                raise ValueError("not_before must be a number")
        except (ValidationError, ValueError) as exc:
            return self._fail_unparseable(
                job_id, task, ErrorCode.MALFORMED_MESSAGE, f"malformed {task} message: {exc}"
            )
        if not_before is not None and float(not_before) - self.clock() > 0.5:
            remaining = float(not_before) - self.clock()
            self._send(task, msg.job_id, msg.seq, remaining)
            return StepResult("deferred", msg.job_id)
        return msg

    def _fail_unparseable(
        self, job_id: str | None, task: str, code: ErrorCode, message: str
    ) -> StepResult:
        """A message we cannot act on: fail its job (if it names one) and keep going."""
        metrics.MALFORMED_MESSAGES.labels(task).inc()
        self.rt.store.incr_stat("malformed_messages")
        log.error("%s", message[:2000])
        if job_id is None:
            return StepResult("malformed")
        error = JobError(code=code, message=message[:2000])
        with log_context(job_id=job_id, task=task):
            job, created = self.rt.store.create_if_absent(
                job_id, None, status=JobStatus.FAILED, error=error
            )
            if created:
                metrics.JOBS_FINISHED.labels("failed").inc()
                return StepResult("malformed", job_id)
            if job.status.is_terminal:
                return StepResult("malformed", job_id)
            with contextlib.suppress(TransitionRefusedError):
                self._finish(job, JobStatus.FAILED, error)
        return StepResult("malformed", job_id)

    def _age(self, job: StoredJob) -> float:
        return self.clock() - job.record.created_at.timestamp()


class _GenerationFailed(ServiceError):
    """Upstream reported the generation as failed in its result."""


def event_body(job: StoredJob) -> bytes:
    """The webhook body: identical on every attempt (no delivery log inside)."""
    record = job.record
    final_at = record.finished_at or record.updated_at
    event = WebhookEvent(
        type=EVENT_FOR_STATUS[record.status],
        timestamp=final_at,
        # the record as it was when it became final: delivery bookkeeping changes later
        data=record.model_copy(update={"webhook": None, "updated_at": final_at}),
    )
    return event.model_dump_json().encode()


def _job_id_from(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The job id a message names, if it names a plausible one."""
    import re

    candidate = args[0] if args else kwargs.get("job_id")
    if isinstance(candidate, str) and re.match(JOB_ID_PATTERN, candidate):
        return candidate
    return None


def _outcome(exc: BaseException) -> str:
    from worker.errors import PermanentUpstreamError, RetryableUpstreamError, UpstreamProtocolError

    if isinstance(exc, RetryableUpstreamError):
        return "retryable"
    if isinstance(exc, PermanentUpstreamError):
        return "permanent"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    if getattr(exc, "retryable", False):
        return "retryable"
    return "permanent"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
