"""Protecting the RunComfy account, with real workers against the emulator's account
limits: a fleet-wide cap and fair shares, no slot leaked by a dead worker, a shared 429
cooldown, a submit rate, an account circuit (pause, readiness says why, resume), error-code
bodies, expired request ids, and ambiguous submit timeouts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from api_contracts.jobs import JobStatus
from worker.cli import main
from worker.devtools.emulator import EmulatorConfig, FaultRule
from worker.jobs.admission import SLOTS_KEY

from .conftest import TOKEN, Stack

pytestmark = pytest.mark.e2e


def emulator(**config: object) -> EmulatorConfig:
    values: dict[str, object] = {"token": TOKEN, "queue_s": 0.1, "run_s": 1.0, "seed": 13}
    values.update(config)
    return EmulatorConfig.model_validate(values)


FAST = {"RECONCILE_INTERVAL_S": "0.5", "RECONCILE_GRACE_S": "1", "POLL_MAX_INTERVAL_S": "0.3"}


def enqueue(stack: Stack, n: int, prefix: str, **fields: object) -> list[str]:
    return [
        stack.producer.enqueue({"input": {"prompt": f"{prefix} {i}"}, **fields}).id
        for i in range(n)
    ]


def all_succeed(stack: Stack, jobs: list[str], timeout: float = 60) -> None:
    for job_id in jobs:
        record = stack.wait(job_id, timeout=timeout)
        assert record.status == JobStatus.SUCCEEDED, (job_id, record.status, record.error)


@pytest.mark.timeout(120)
def test_the_fleet_cap_holds_waiting_jobs_say_so_and_no_slot_leaks(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = stack_factory(
        emulator(run_s=1.5, max_concurrent=4), RUNCOMFY_MAX_CONCURRENCY="3", **FAST
    )
    stack.start_worker()
    victim = stack.start_worker()
    jobs = enqueue(stack, 12, "capped")
    waiting = stack.wait(
        jobs[-1], lambda r: r.wait is not None and r.status == JobStatus.QUEUED, timeout=10
    )
    assert waiting.wait is not None and waiting.wait.reason == "slot"
    assert stack.producer.get(jobs[-1]).wait.position is not None  # type: ignore[union-attr]
    victim.kill()  # holding slots of jobs in upstream: the slots belong to the jobs
    all_succeed(stack, jobs)
    counters = stack.emulator.counters()
    assert counters["max_in_upstream"] <= 3
    assert sum(counters["too_many_requests"].values()) == 0
    time.sleep(1.0)
    assert stack.redis.zcard(SLOTS_KEY) == 0  # every slot came back
    assert stack.producer.get(jobs[0]).wait is None


@pytest.mark.timeout(120)
def test_a_small_tenant_is_not_held_back_by_a_big_batch(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = stack_factory(emulator(run_s=1.0), RUNCOMFY_MAX_CONCURRENCY="2", **FAST)
    stack.start_worker()
    big = enqueue(stack, 24, "big", tenant="big")
    time.sleep(1.5)
    started = time.monotonic()
    [small] = enqueue(stack, 1, "small", tenant="small")
    stack.wait(small, lambda r: r.status == JobStatus.SUCCEEDED, timeout=30)
    small_s = time.monotonic() - started
    # one generation for a free slot (round-robin puts it next), one for itself, + polling
    assert small_s < 5.0, small_s
    done_big = sum(1 for j in big if stack.producer.get(j).status == JobStatus.SUCCEEDED)
    assert done_big < len(big)  # it really overtook the batch
    all_succeed(stack, big, timeout=90)


@pytest.mark.timeout(120)
def test_a_429_pauses_every_submit_and_the_rate_limit_keeps_them_away(stack_factory) -> None:  # type: ignore[no-untyped-def]
    # The emulator allows 2 submits/s; the fleet is told 1.5/s and waits out any 429.
    stack: Stack = stack_factory(
        emulator(run_s=0.3, max_submits_per_s=2.0, retry_after_s=1.0),
        RUNCOMFY_MAX_SUBMITS_PER_S="1.5",
        **FAST,
    )
    stack.start_worker()
    stack.start_worker()
    jobs = enqueue(stack, 8, "paced")
    all_succeed(stack, jobs)
    assert stack.emulator.counters()["too_many_requests"].get("rate", 0) == 0
    # A 429 anyway (a fault): the cooldown it starts is shared by the whole fleet.
    stack.emulator.set_faults([FaultRule(kind="429", endpoint="submit", retry_after_s=2.0)])
    [first] = enqueue(stack, 1, "cooled")
    deadline = time.monotonic() + 10
    while stack.redis.pttl("rcw:cooldown") <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.redis.pttl("rcw:cooldown") > 0
    all_succeed(stack, [first, *enqueue(stack, 3, "after")])


@pytest.mark.timeout(150)
def test_an_account_error_pauses_submissions_until_resume(  # type: ignore[no-untyped-def]
    stack_factory, tmp_path: Path
) -> None:
    heartbeat = tmp_path / "heartbeat.json"
    stack: Stack = stack_factory(
        emulator(run_s=0.3, balance=2.0, account_errors_as_200=True),
        RUNCOMFY_ACCOUNT_PROBE_S="3600",
        WORKER_HEARTBEAT_FILE=str(heartbeat),
        **FAST,
    )
    stack.start_worker()
    jobs = enqueue(stack, 5, "billed")
    # two submits fit the balance (whichever come first); the third meets the account error
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = [stack.producer.get(j) for j in jobs]
        done = [r for r in records if r.status == JobStatus.SUCCEEDED]
        held = [r for r in records if r.wait is not None and r.wait.reason == "paused"]
        if len(done) == 2 and len(held) == 3:
            break
        time.sleep(0.1)
    assert (len(done), len(held)) == (2, 3), [(r.status, r.wait) for r in records]
    time.sleep(1.0)
    assert sum(1 for j in jobs if stack.producer.get(j).status.is_terminal) == 2  # none failed
    env = {**stack.env, "WORKER_HEARTBEAT_FILE": str(heartbeat)}
    deadline = time.monotonic() + 20  # the heartbeat says "consuming" within an interval
    ready = CliRunner().invoke(main, ["healthcheck", "--ready"], env=env)
    while "not consuming" in ready.output and time.monotonic() < deadline:
        time.sleep(0.5)
        ready = CliRunner().invoke(main, ["healthcheck", "--ready"], env=env)
    assert ready.exit_code == 1
    assert "paused" in ready.output and "400002" in ready.output

    stack.emulator.top_up(10)
    resumed = CliRunner().invoke(main, ["resume"], env=stack.env)
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output
    all_succeed(stack, jobs)
    assert CliRunner().invoke(main, ["healthcheck", "--ready"], env=env).exit_code == 0


@pytest.mark.timeout(60)
def test_an_expired_request_id_fails_the_job_upstream_expired(stack_factory) -> None:  # type: ignore[no-untyped-def]
    # The request finishes at ~0.4 s and expires 0.5 s later; the first check is at 2 s.
    stack: Stack = stack_factory(
        emulator(run_s=0.3, request_ttl_s=0.5), POLL_INITIAL_DELAY_S="2", **FAST
    )
    stack.start_worker()
    [job_id] = enqueue(stack, 1, "expiring")
    record = stack.wait(job_id, timeout=30)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "upstream_expired"
    assert "expired" in record.error.message
    # the same code in an HTTP 200 body (some RunComfy APIs answer that way)
    stack.emulator.set_faults(
        [FaultRule(kind="error_code_200", endpoint="status", error_code=404001, times=None)]
    )
    [again] = enqueue(stack, 1, "expired in a 200")
    record = stack.wait(again, timeout=30)
    stack.emulator.set_faults([])
    assert record.error is not None and record.error.code == "upstream_expired"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", ["resubmit", "fail"])
def test_a_submit_timeout_after_sending_is_counted_and_follows_the_policy(  # type: ignore[no-untyped-def]
    stack_factory, policy: str
) -> None:
    stack: Stack = stack_factory(
        emulator(run_s=0.3), SUBMIT_AMBIGUOUS=policy, RUNCOMFY_READ_TIMEOUT_S="0.5", **FAST
    )
    stack.start_worker()
    stack.emulator.set_faults([FaultRule(kind="slow", endpoint="submit", delay_s=1.5)])
    [job_id] = enqueue(stack, 1, f"ambiguous {policy}")
    record = stack.wait(job_id, timeout=60)
    assert any(n.startswith("ambiguous_submit") for n in record.notes)
    assert stack.producer.rt.store.stats().get("ambiguous_submits", 0) >= 1
    if policy == "resubmit":
        assert record.status == JobStatus.SUCCEEDED, record.error
        assert stack.emulator.counters()["submits"] == 2  # the slow one was accepted too
    else:
        assert record.status == JobStatus.FAILED
        assert record.error is not None and record.error.code == "submit_ambiguous"


@pytest.mark.timeout(120)
def test_a_high_priority_job_overtakes_waiting_low_ones_and_the_cli_sets_both(  # type: ignore[no-untyped-def]
    stack_factory,
) -> None:
    stack: Stack = stack_factory(emulator(run_s=0.8), RUNCOMFY_MAX_CONCURRENCY="1", **FAST)
    stack.start_worker()
    lows = enqueue(stack, 6, "low", priority="low", tenant="batch")
    time.sleep(0.5)
    made = CliRunner().invoke(
        main,
        ["submit", "--prompt", "urgent", "--tenant", "ops", "--priority", "high", "--json"],
        env=stack.env,
    )
    assert made.exit_code == 0, made.output
    import json

    high = json.loads(made.stdout)
    assert (high["request"]["tenant"], high["request"]["priority"]) == ("ops", "high")
    stack.wait(high["id"], lambda r: r.status == JobStatus.SUCCEEDED, timeout=30)
    finished_lows = sum(1 for j in lows if stack.producer.get(j).status.is_terminal)
    assert finished_lows <= 2, finished_lows  # it went next, not after the six
    all_succeed(stack, lows)
