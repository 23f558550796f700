"""``runcomfy.notify(job_id, seq)``: one signed delivery attempt of the job's final event.

The webhook id (``msg_<job_id>``) and the body are the same on every attempt, so receivers
can dedupe; when to try again is the ``WEBHOOK_RETRY_SCHEDULE``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from api_contracts.jobs import EVENT_FOR_STATUS, WebhookDelivery, WebhookEvent, WebhookState
from api_contracts.messages import TASK_NOTIFY, StepMessage
from worker import metrics
from worker.jobs.handoff import Outcome, StepResult
from worker.jobs.state import JobChange, StoredJob
from worker.jobs.steps import StepContext
from worker.logs import log_context
from worker.services.webhooks import next_retry_delay

log = logging.getLogger(__name__)


def notify(ctx: StepContext, msg: StepMessage) -> StepResult:
    """Run one notify message."""
    opened = ctx.handoff.open(TASK_NOTIFY, msg)
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
            return StepResult(Outcome.NOTHING_TO_SEND, job.id)
        attempt = len(info.deliveries) + 1
        with log_context(attempt=attempt):
            result = ctx.webhooks.deliver(
                record.request.webhook_url, info.id, event_body(job), timestamp=int(ctx.clock())
            )
        metrics.WEBHOOK_ATTEMPTS.labels(result.outcome).inc()
        error = result.error
        if result.outcome == "forbidden":
            error = f"webhook_target_forbidden: {result.error}"
        delivery = WebhookDelivery(
            attempt=attempt,
            at=datetime.now(UTC),
            status_code=result.status_code,
            error=error,
            duration_ms=result.duration_ms,
        )
        deliveries = [*info.deliveries, delivery]
        if result.outcome == "retry":
            delay = next_retry_delay(ctx.settings.webhook.retry_schedule, attempt)
            if delay is not None:
                pending = info.model_copy(update={"deliveries": deliveries})
                ctx.handoff.handoff(
                    job, TASK_NOTIFY, countdown=delay, change=JobChange(webhook=pending)
                )
                log.info("webhook attempt %d failed; next in %.0fs", attempt, delay)
                return StepResult(Outcome.RETRY, job.id)
        state = WebhookState.DELIVERED if result.outcome == "delivered" else WebhookState.FAILED
        if state == WebhookState.DELIVERED and record.finished_at is not None:
            metrics.STAGE_SECONDS.labels("webhook").observe(
                (datetime.now(UTC) - record.finished_at).total_seconds()
            )
        done = info.model_copy(update={"deliveries": deliveries, "state": state})
        ctx.store.update(job, JobChange(seq=job.seq + 1, outbox=None, webhook=done))
        log.info("webhook %s after %d attempt(s)", state.value, attempt)
        return StepResult(
            Outcome.WEBHOOK_DELIVERED
            if state == WebhookState.DELIVERED
            else Outcome.WEBHOOK_FAILED,
            job.id,
        )


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
