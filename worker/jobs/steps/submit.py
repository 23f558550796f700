"""``runcomfy.submit(job_id, request, seq=0)``: create the job if absent, POST it upstream
once, then hand off to the first status check.

Submit POSTs only from ``queued`` (or after a lease expired: the ambiguous window, counted
and noted on the job); once ``request_id`` is stored it never POSTs again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobError, JobStatus, WaitInfo
from api_contracts.messages import TASK_POLL, TASK_SUBMIT, SubmitMessage
from worker import metrics
from worker.errors import RetryableUpstreamError, ServiceError
from worker.jobs import decisions
from worker.jobs.admission import Circuit
from worker.jobs.handoff import Outcome, StepResult
from worker.jobs.state import JobChange, Lease, StoredJob
from worker.jobs.steps import StepContext, call_outcome, learned_runtimes
from worker.logs import log_context

log = logging.getLogger(__name__)

#: How long a submit holds its lease while talking to upstream (beyond the HTTP timeouts).
LEASE_MARGIN_S: Final = 15.0
#: Attempts to record upstream's answer when the job changed between claim and answer.
RECORD_ATTEMPTS: Final = 3
#: Answers of POSTs whose write failed, kept per process for the retry (bounded).
UNRECORDED_MAX: Final = 10_000
#: The fleet-wide pause after a 429 without Retry-After.
DEFAULT_COOLDOWN_S: Final = 5.0


def submit(ctx: StepContext, msg: SubmitMessage, *, owner: str) -> StepResult:
    """Run one submit message; ``owner`` names this delivery (the lease holder)."""
    if ctx.handoff.defer_if_early(TASK_SUBMIT, msg):
        return StepResult(Outcome.DEFERRED, msg.job_id)
    with log_context(job_id=msg.job_id, task=TASK_SUBMIT):
        # Producers normally created the record already: read first, create only if absent.
        job = ctx.store.get(msg.job_id)
        if job is None:
            job, created = ctx.store.create_if_absent(msg.job_id, msg.request)
            if created:
                log.info("job created by its submit message")
        if not ctx.handoff.is_current(job, msg.seq, TASK_SUBMIT):
            return StepResult(Outcome.STALE, msg.job_id)
        if job.status.is_terminal or job.record.request_id:
            return StepResult(Outcome.ALREADY_SUBMITTED, msg.job_id)
        ambiguous = False
        if job.status == JobStatus.SUBMITTING and job.lease is not None:
            if job.lease.owner != owner and job.lease.until > job.read_at:
                return StepResult(Outcome.SUBMIT_IN_PROGRESS_ELSEWHERE, msg.job_id)
            ambiguous = True
        held, circuit = _admitted(ctx, job)
        if held is not None:
            return held
        if job.age_s >= ctx.settings.job.deadline_s:
            # No paid generation for a job that is already past its deadline.
            message = f"not submitted within {ctx.settings.job.deadline_s:.0f}s (JOB_DEADLINE_S)"
            error = JobError(code=ErrorCode.DEADLINE_EXCEEDED, message=message)
            ctx.handoff.finish(job, JobStatus.FAILED, error, JobChange(lease=None))
            return StepResult(Outcome.FAILED, job.id)
        return _post(ctx, job, owner=owner, ambiguous=ambiguous, probing=circuit == "probing")


def _admitted(ctx: StepContext, job: StoredJob) -> tuple[StepResult | None, Circuit]:
    """None when the job may be submitted now; else what holds it back (it waits in the job
    store for a slot or for the circuit, or its submit comes back after a cooldown). And
    the account circuit as it was seen."""
    adm = ctx.handoff.admission
    # The circuit and the 429 cooldown in one round trip: both are asked on every submit.
    circuit, cooldown_ms = adm.gate()
    if circuit == "open":
        return _wait(ctx, job, "paused", front=adm.release(job.id, job.record.request)), circuit
    if (adm.enabled or circuit == "probing") and not adm.holds_slot(job.id):
        return _wait(ctx, job, "slot", front=False), circuit
    # The account is usable and the job may go: but not during a 429 cooldown, and not
    # faster than the fleet's submit rate.
    wait_ms = cooldown_ms or adm.take_token()
    if wait_ms > 0:
        after = ctx.handoff.handoff(job, TASK_SUBMIT, countdown=wait_ms / 1000.0)
        return StepResult(Outcome.RETRY if after else Outcome.LOST_RACE, job.id), circuit
    return None, circuit


def _wait(ctx: StepContext, job: StoredJob, reason: str, *, front: bool) -> StepResult:
    """Into the waiting room; the record says why and where. No message is promised: the
    job leaves the due index, and admission (or any reconcile pass) sends its submit."""
    adm = ctx.handoff.admission
    adm.enter(job.id, job.record.request, front=front)
    position = adm.position(job.id, job.record.request)
    since = job.record.wait.since if job.record.wait else datetime.fromtimestamp(job.read_at, UTC)
    wait = WaitInfo(
        reason="paused" if reason == "paused" else "slot", since=since, position=position
    )
    ctx.store.update(job, JobChange(wait=wait, due_in=None, lease=None))
    log.info(
        "waiting for a RunComfy %s (position %s)",
        "circuit" if reason == "paused" else "slot",
        position,
    )
    ctx.handoff.admit_waiting()
    return StepResult(Outcome.WAITING, job.id)


def _post(
    ctx: StepContext, job: StoredJob, *, owner: str, ambiguous: bool, probing: bool
) -> StepResult:
    """Claim the job, POST it, record the answer. ``probing``: the account circuit was
    half-open when this submit was let through (it is the probe)."""
    # This process POSTed for this job before, and only writing the answer failed (Redis
    # went away): record that answer instead of POSTing (and paying) again.
    remembered = ctx.unrecorded.get(job.id)
    if remembered is not None:
        ambiguous = False
    # The lease covers the client's whole timeout budget (pool, connect, write, read), on
    # the store's clock: another delivery only takes over once this POST cannot be running.
    lease_s = ctx.settings.runcomfy.call_budget_s + LEASE_MARGIN_S
    now = job.read_at
    lease = Lease(owner, now + lease_s)
    notes = list(job.record.notes)
    if ambiguous:
        # Killed between POST and recording its answer: upstream may hold a request we
        # never saw. Submitting again may cost a second generation; not submitting may
        # lose the job. We submit again (at-least-once) and say so on the job.
        metrics.AMBIGUOUS_SUBMITS.inc()
        ctx.store.incr_stat("ambiguous_submits")
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        notes.append(
            f"ambiguous_submit: a previous submit attempt may have reached upstream "
            f"before the worker stopped ({stamp}); submitted again"
        )
        log.warning("ambiguous submit window: submitting again")
    claimed = ctx.store.update(
        job,
        JobChange(
            status=JobStatus.SUBMITTING,
            lease=lease,
            notes=notes,
            # overdue once the lease has expired without an answer recorded
            due_in=lease_s + ctx.handoff.grace_s,
        ),
    )
    if claimed is None:
        return StepResult(Outcome.LOST_RACE, job.id)
    request = claimed.record.request
    assert request is not None  # a job with a parsed request is the only kind we submit
    if remembered is not None:
        request_id = remembered
        log.warning("recording the answer of this process's earlier POST (its write failed)")
    else:
        try:
            request_id = ctx.upstream.submit(request.input).request_id
        except ServiceError as exc:
            metrics.UPSTREAM_CALLS.labels("submit", call_outcome(exc)).inc()
            return _failed(ctx, claimed, exc)
        metrics.UPSTREAM_CALLS.labels("submit", "ok").inc()
        if probing:
            # The probe went through: the half-open circuit closes. A submit let through
            # while the circuit was closed asks nothing (one round trip less per job): if
            # the circuit opened meanwhile, it was for an account error newer than this
            # POST's acceptance, so it stays open until its own probe.
            ctx.handoff.admission.submitted()
    try:
        return _record(ctx, job, claimed, request_id, owner=owner)
    except Exception:
        _remember(ctx.unrecorded, job.id, request_id)
        raise


def _remember(unrecorded: dict[str, str], job_id: str, request_id: str) -> None:
    unrecorded[job_id] = request_id
    while len(unrecorded) > UNRECORDED_MAX:  # only Redis outages add entries; keep it bounded
        unrecorded.pop(next(iter(unrecorded)))


def _record(
    ctx: StepContext, job: StoredJob, claimed: StoredJob, request_id: str, *, owner: str
) -> StepResult:
    """Write upstream's answer and hand off to the first status check."""
    # On the store's clock, like every time the schedule compares (POSTed just after the read)
    submitted_at = datetime.fromtimestamp(claimed.read_at, UTC)
    metrics.STAGE_SECONDS.labels("queued").observe(
        (submitted_at - claimed.record.created_at).total_seconds()
    )
    with log_context(request_id=request_id):
        recorded = JobChange(
            status=JobStatus.IN_QUEUE,
            request_id=request_id,
            submitted_at=submitted_at,
            lease=None,
            attempt=0,
            since=0.0,
        )
        countdown = _first_check(ctx, claimed)
        after = ctx.handoff.handoff(claimed, TASK_POLL, countdown=countdown, change=recorded)
        for _ in range(RECORD_ATTEMPTS):
            if after is not None:
                break
            # Something else wrote the job since our claim (a status-only change): record
            # the answer on the fresh copy while our lease still holds it. Running the step
            # again instead would POST a second time.
            fresh = ctx.store.get(claimed.id)
            if not _still_ours(fresh, owner):
                log.warning("submitted upstream, but the job moved on meanwhile")
                return StepResult(Outcome.LOST_RACE, job.id)
            assert fresh is not None
            after = ctx.handoff.handoff(fresh, TASK_POLL, countdown=countdown, change=recorded)
        ctx.unrecorded.pop(job.id, None)
        log.info("submitted upstream")
    return StepResult(Outcome.SUBMITTED if after else Outcome.LOST_RACE, job.id)


def _first_check(ctx: StepContext, job: StoredJob) -> float:
    """When to look first: ``POLL_INITIAL_DELAY_S``, or later when earlier jobs of the kind
    all took longer (:func:`worker.jobs.decisions.first_check`)."""
    _, learned = learned_runtimes(ctx, job)
    countdown, _ = decisions.first_check(learned.total, ctx.settings.poll)
    return countdown


def _still_ours(job: StoredJob | None, owner: str) -> bool:
    return (
        job is not None
        and job.status == JobStatus.SUBMITTING
        and not job.record.request_id
        and job.lease is not None
        and job.lease.owner == owner
    )


def _failed(ctx: StepContext, job: StoredJob, exc: ServiceError) -> StepResult:
    if isinstance(exc, RetryableUpstreamError) and exc.status_code == 429:
        # The account's limit, not this job's: every submit of the fleet waits it out.
        cooldown = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_COOLDOWN_S
        ctx.handoff.admission.start_cooldown(cooldown)
        metrics.SUBMIT_COOLDOWNS.inc()
        log.warning("429 from RunComfy: all submits wait %.1fs", cooldown)
    attempt = job.attempt + 1
    decision = decisions.decide_submit_error(
        exc,
        attempt=attempt,
        age_s=job.age_s,
        deadline_s=ctx.settings.job.deadline_s,
        jitter=ctx.rng.random(),
    )
    if isinstance(decision, decisions.PauseAccount):
        # The account, not this job: every submit would fail the same way. Pause the fleet,
        # keep the job (back at the front of its queue), and probe later.
        status_code: int | None = getattr(exc, "status_code", None)
        code = str(decision.error_code or status_code or "account")
        ctx.handoff.admission.pause(code, decision.message, now=job.read_at)
        metrics.ACCOUNT_PAUSES.labels(code).inc()
        log.error("account error from RunComfy: submissions paused (%s)", decision.message)
        ctx.handoff.admission.release(job.id, job.record.request)
        return _wait(ctx, ctx.store.get(job.id) or job, "paused", front=True)
    if isinstance(decision, decisions.Fail):
        log.warning("submit failed: %s", decision.message)
        ctx.handoff.finish(
            job,
            JobStatus.FAILED,
            JobError(code=decision.code, message=decision.message),
            JobChange(lease=None),
        )
        return StepResult(Outcome.FAILED, job.id)
    change = JobChange(lease=None, attempt=attempt)
    if isinstance(decision, decisions.AmbiguousSubmit):
        # The POST was sent and its answer lost: upstream may hold (and bill) a request.
        metrics.AMBIGUOUS_SUBMITS.inc()
        ctx.store.incr_stat("ambiguous_submits")
        stamp = datetime.fromtimestamp(job.read_at, UTC).isoformat(timespec="seconds")
        note = f"ambiguous_submit: the submit timed out after sending ({stamp})"
        if ctx.settings.submit.ambiguous == "fail":
            message = f"{note}; not submitted again (SUBMIT_AMBIGUOUS=fail)"
            error = JobError(code=ErrorCode.SUBMIT_AMBIGUOUS, message=message)
            ctx.handoff.finish(
                job, JobStatus.FAILED, error, change.but(notes=[*job.record.notes, message])
            )
            return StepResult(Outcome.FAILED, job.id)
        change = change.but(notes=[*job.record.notes, f"{note}; submitted again"])
    log.info("submit will retry in %.1fs: %s", decision.countdown, exc)
    ctx.handoff.handoff(job, TASK_SUBMIT, countdown=decision.countdown, change=change)
    return StepResult(Outcome.RETRY, job.id)
