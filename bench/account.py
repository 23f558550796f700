"""Protecting the RunComfy account: a fleet-wide cap, fair shares, no 429s.

Three tenants share one account: a big batch (1,800 jobs) arrives first, then a medium
(150) and a small (50) tenant while it runs (quick: 360 / 30 / 10). The workers run with
``RUNCOMFY_MAX_CONCURRENCY=50`` against an emulator that refuses a 61st concurrent request
with a 429 (its ``max_concurrent`` = 60) and runs each generation for ``RUN_S``:

* most jobs in upstream at once, as the emulator saw it (target ≤ 50);
* 429s the emulator answered (target 0);
* each tenant's p50 / p95 wait for a slot (admission time - creation time, both Redis TIME
  in the job hash); target: the two small tenants' p95 ≤ 2 x one generation time;
* dispatch overhead per job: worker + Redis CPU per job against the same jobs with no cap.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    Row,
    Stack,
    Worker,
    close_all,
    cpu_seconds,
    percentile,
    start_all,
    tree_cpu_seconds,
    wait_until,
)

CAP = 50
EMULATOR_CAP = 60
RUN_S = 2.0
TENANTS_FULL = {"big": 1800, "medium": 150, "small": 50}
TENANTS_QUICK = {"big": 360, "medium": 30, "small": 10}
SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.5",
    "POLL_MIN_INTERVAL_S": "0.25",
    "POLL_MAX_INTERVAL_S": "0.5",
    "RECONCILE_INTERVAL_S": "2",
    "RECONCILE_GRACE_S": "5",
    "JOB_DEADLINE_S": "3600",
    "WEBHOOK_RETRY_SCHEDULE": "0.5,1,1",
}


def _request(tenant: str, i: int) -> dict[str, Any]:
    return {
        "input": {"prompt": f"{tenant} {i}", "size": "1024x1024", "force_single": True},
        "tenant": tenant,
    }


def _run(stack: Stack, tenants: dict[str, int], capped: bool) -> dict[str, Any]:
    """One run: the big batch first, the others 2 s later; all to final."""
    stack.redis.flushall()
    stack.emulator.reset()
    stack.emulator.update_config(
        queue_s=0,
        run_s=RUN_S,
        capacity=1_000_000,
        max_concurrent=EMULATOR_CAP if capped else None,
        output_min_bytes=0,
    )
    extra = dict(SETTINGS)
    if capped:
        extra["RUNCOMFY_MAX_CONCURRENCY"] = str(CAP)
    producer = stack.producer(0, **extra)
    workers = [Worker(stack.env(0, **extra), name=f"account{i}") for i in range(2)]
    start_all(workers)
    redis_pid = int(stack.redis.info("server")["process_id"])
    cpu_before = sum(tree_cpu_seconds(w.pid) for w in workers) + cpu_seconds(redis_pid)
    ids: dict[str, list[str]] = {}
    started = time.monotonic()
    try:
        big = [_request("big", i) for i in range(tenants["big"])]
        ids["big"] = [
            r.id
            for chunk in range(0, len(big), 200)
            for r in producer.enqueue_many(big[chunk : chunk + 200])
        ]
        time.sleep(2.0)
        for tenant in ("medium", "small"):
            ids[tenant] = [
                r.id
                for r in producer.enqueue_many(
                    [_request(tenant, i) for i in range(tenants[tenant])]
                )
            ]
        everyone = [j for group in ids.values() for j in group]
        wait_until(
            lambda: (
                all(producer.get(j).status.is_terminal for j in everyone[-50:])
                and all(producer.get(j).status.is_terminal for j in everyone)
            ),
            900,
            "every job final",
            1.0,
        )
        seconds = time.monotonic() - started
        cpu = sum(tree_cpu_seconds(w.pid) for w in workers) + cpu_seconds(redis_pid) - cpu_before
    finally:
        close_all(workers)
        producer.app.close_runtime()
    counters = stack.emulator.counters()
    waits: dict[str, list[float]] = {}
    for tenant, group in ids.items():
        for job_id in group:
            fields = stack.redis.hmget(f"rcw:job:{job_id}", "created_ts", "admitted_ts")
            created, admitted = (float(v or 0) for v in fields)
            waits.setdefault(tenant, []).append(max(0.0, admitted - created) if admitted else 0.0)
    failed = sum(
        1
        for group in ids.values()
        for j in group
        if stack.redis.hget(f"rcw:job:{j}", "status") != b"succeeded"
    )
    return {
        "jobs": sum(len(g) for g in ids.values()),
        "seconds": seconds,
        "not_succeeded": failed,
        "max_in_upstream": counters.get("max_in_upstream"),
        "429s": sum(counters.get("too_many_requests", {}).values()),
        "429s_by_reason": dict(counters.get("too_many_requests", {})),
        "cpu_ms_per_job": cpu * 1000 / max(1, sum(len(g) for g in ids.values())),
        "wait_p50_s": {t: percentile(w, 50) for t, w in waits.items()},
        "wait_p95_s": {t: percentile(w, 95) for t, w in waits.items()},
    }


def run(stack: Stack, quick: bool) -> list[Row]:
    """The account-protection rows."""
    tenants = TENANTS_QUICK if quick else TENANTS_FULL
    capped = _run(stack, tenants, capped=True)
    free = _run(stack, tenants, capped=False)
    p95 = capped["wait_p95_s"]
    small_ok = max(p95["medium"], p95["small"]) <= 2 * RUN_S
    overhead = capped["cpu_ms_per_job"] - free["cpu_ms_per_job"]
    mix = " / ".join(f"{n:,}" for n in tenants.values())
    return [
        Row(
            "account: most jobs in upstream at once (emulator)",
            capped["max_in_upstream"],
            "jobs",
            baseline=free["max_in_upstream"],
            target=f"≤ {CAP} (RUNCOMFY_MAX_CONCURRENCY)",
            passed=capped["max_in_upstream"] is not None and capped["max_in_upstream"] <= CAP,
            note=f"{capped['jobs']:,} jobs, tenants {mix}; baseline = same jobs, no cap",
            details={"capped": capped, "no_cap": free},
        ),
        Row(
            "account: 429s received",
            capped["429s"],
            "429s",
            target="0",
            passed=capped["429s"] == 0,
            note=(
                f"the emulator refuses a concurrent request beyond {EMULATOR_CAP}; "
                f"by reason {capped['429s_by_reason']}; without the cap: {free['429s']}"
            ),
        ),
        Row(
            "account: small tenants' p95 wait for a slot",
            max(p95["medium"], p95["small"]),
            "s",
            baseline=p95["big"],
            target=f"≤ 2 x one generation = {2 * RUN_S:.0f} s",
            passed=small_ok,
            note=(
                "p50/p95 wait by tenant: "
                + ", ".join(f"{t} {capped['wait_p50_s'][t]:.1f}/{p95[t]:.1f} s" for t in tenants)
                + "; baseline = the big tenant's p95"
            ),
        ),
        Row(
            "account: dispatch overhead per job (worker + Redis CPU)",
            overhead,
            "ms",
            baseline=free["cpu_ms_per_job"],
            target="report (baseline = same jobs, no cap)",
            passed=None,
            note=(
                f"capped {capped['cpu_ms_per_job']:.1f} ms/job in {capped['seconds']:.0f} s, "
                f"no cap {free['cpu_ms_per_job']:.1f} ms/job in {free['seconds']:.0f} s; "
                f"not succeeded: {capped['not_succeeded']} / {free['not_succeeded']}"
            ),
        ),
    ]
