"""bench/profile_poll.py's bookkeeping: which package a function belongs to, how stdlib and C
time is charged to its caller, and that the report renders (no servers, no worker)."""

from __future__ import annotations

import cProfile
import json
import signal
import sys
from typing import Any

import pytest

from bench.common import ROOT
from bench.profile_poll import (
    _STDLIB,
    NEUTRAL,
    OUTSIDE_STEPS,
    Sampler,
    Split,
    Window,
    call_tree,
    charged_group,
    group_of,
    notable,
    report,
    step_of,
    step_table,
)

SITE = "/venv/lib/python3.11/site-packages"


def test_files_are_grouped_by_package() -> None:
    assert group_of(f"{SITE}/celery/app/trace.py") == "celery"
    assert group_of(f"{SITE}/vine/promises.py") == "celery"
    assert group_of(f"{SITE}/kombu/transport/redis.py") == "kombu"
    assert group_of(f"{SITE}/redis/client.py") == "redis"
    assert group_of(f"{SITE}/httpcore/_sync/http11.py") == "httpx"
    assert group_of(f"{SITE}/pydantic_core/core_schema.py") == "pydantic"
    assert group_of(f"{SITE}/boto3/session.py") == "boto"
    assert group_of(f"{SITE}/botocore/endpoint.py") == "boto"
    assert group_of(f"{SITE}/moto/core.py") == "other"
    assert group_of(f"{ROOT}/worker/jobs/steps/poll.py") == "worker"
    assert group_of(f"{ROOT}/api_contracts/jobs.py") == "worker"
    assert group_of(f"{ROOT}/worker/logs.py") == "logging"
    assert group_of(f"{_STDLIB}/logging/__init__.py") == "logging"
    assert group_of(f"{_STDLIB}/json/encoder.py") == "json"
    # charged to the caller
    assert group_of(f"{_STDLIB}/socket.py") is None
    assert group_of("<frozen os>") is None
    assert group_of("~") is None


def test_stdlib_and_c_time_is_charged_to_the_calling_package() -> None:
    poll = (f"{ROOT}/worker/jobs/steps/poll.py", 30, "poll")
    send = (f"{SITE}/redis/connection.py", 10, "send")
    sock = (f"{_STDLIB}/socket.py", 5, "makefile")
    sendall = ("~", 0, "<method 'sendall' of '_socket.socket' objects>")
    stats: dict[Any, Any] = {
        poll: (1, 1, 0.001, 0.010, {}),
        send: (2, 2, 0.002, 0.009, {poll: (2, 2, 0.002, 0.009)}),
        sock: (1, 1, 0.001, 0.001, {send: (1, 1, 0.001, 0.001)}),
        sendall: (4, 4, 0.006, 0.006, {sock: (2, 2, 0.003, 0.003), poll: (2, 2, 0.003, 0.003)}),
    }
    table = Split(stats).by_group()
    assert table["worker"]["own"] == 0.001
    assert table["redis"]["own"] == 0.002
    assert round(table[NEUTRAL]["own"], 6) == 0.007
    # sock (0.001) and half of sendall (via sock → send) go to redis, the other half to ours
    assert round(table["redis"]["charged"], 6) == 0.006
    assert round(table["worker"]["charged"], 6) == 0.004
    assert [key for key, *_ in Split(stats).top(2)] == [sendall, send]


def _run_in(filename: str, source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"sys": sys}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_sampler_charges_a_stdlib_leaf_to_its_package_caller() -> None:
    inner = _run_in(f"{_STDLIB}/socket.py", "def inner(s):\n    s(0, sys._getframe())\n")
    outer = _run_in(f"{SITE}/kombu/fake.py", "def outer(s, inner):\n    inner(s)\n")
    sampler = Sampler()
    outer["outer"](sampler, inner["inner"])
    data = json.loads(json.dumps(sampler.stop()))
    assert data["samples"] == 1
    assert data["own"] == {NEUTRAL: 1}
    assert data["charged"] == {"kombu": 1}
    assert [key[2] for key, _ in data["leaf"]] == ["inner"]
    [(frames, count)] = data["stacks"]
    assert [f[2] for f in frames[-2:]] == ["outer", "inner"] and count == 1
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def _window(checks: int, seconds: float, cpu_s: float) -> Window:
    window = Window.__new__(Window)
    window.checks, window.seconds, window.cpu_s, window.main_cpu_s = checks, seconds, cpu_s, cpu_s
    return window


@pytest.mark.parametrize("whole_jobs", [False, True], ids=["checks", "jobs"])
def test_report_renders(whole_jobs: bool) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    json.dumps({"a": [1, 2, 3]})
    profiler.disable()
    profiler.create_stats()
    stats = profiler.stats
    json_key = [f"{_STDLIB}/json/encoder.py", 183, "encode"]
    result: dict[str, Any] = {
        "jobs": 4,
        "timer": "thread CPU",
        "unprofiled": _window(100, 1.0, 0.3),
        "sampled": _window(100, 1.0, 0.3),
        "profiled": _window(10, 1.0, 0.1),
        "samples": {
            "samples": 10,
            "own": {"json": 6, NEUTRAL: 4},
            "charged": {"json": 6, "other": 4},
            "leaf": [[json_key, 6]],
            "stacks": [[[json_key], 6]],
        },
        "stats": stats,
        "whole_jobs": whole_jobs,
    }
    if whole_jobs:
        for name in ("unprofiled", "sampled", "profiled"):
            result[name].unit = "job"
    text = report(result)
    unit = "job" if whole_jobs else "check"
    assert f"100 {unit}s in 1.0 s = 100/s; CPU per {unit} 3,000 µs" in text
    assert ("CPU by step" in text) is whole_jobs
    assert "json/encoder.py:183(encode)" in text
    json_row = next(line for line in text.splitlines() if line.strip().startswith("json"))
    assert "60.0%" in json_row
    assert "1,800" in json_row  # 60 % of 3,000 µs


def test_call_tree_collapses_single_chains_and_keeps_siblings() -> None:
    def key(name: str) -> list[Any]:
        return [f"{SITE}/celery/{name}.py", 1, name]

    loop, task, run, poll, ack, http = (
        key(n) for n in ("loop", "task", "run", "poll", "ack", "http")
    )
    stacks = [
        [[loop, task, run, poll, http], 60],
        [[loop, task, run, poll], 20],
        [[loop, task, ack], 15],
        [[loop], 5],
    ]
    lines = [line.split("µs", 1)[1].rstrip() for line in call_tree(stacks, 100, 1000.0)]
    # the top chain (loop … task, where the work forks) is the tree's root, not shown
    assert lines == [
        "  celery/run.py:1(run) … celery/poll.py:1(poll)",
        "    celery/http.py:1(http)",
        "  celery/ack.py:1(ack)",
    ]


def test_notable_counts_each_stack_once() -> None:
    client = [f"{SITE}/kombu/transport/redis.py", 2047, "_create_client"]
    loop = [f"{SITE}/kombu/asynchronous/hub.py", 1, "loop"]
    stacks = [[[loop, client, client], 3], [[loop], 7]]
    assert notable(stacks, 10) == [(0.3, "kombu: a new redis.Redis per command")]


def test_step_table_splits_samples_by_step_and_package() -> None:
    loop = [f"{SITE}/kombu/asynchronous/hub.py", 1, "create_loop"]
    task = [f"{ROOT}/worker/queueing/tasks.py", 211, "run_task"]
    archive = [f"{ROOT}/worker/jobs/steps/archive.py", 37, "archive"]
    boto = [f"{SITE}/botocore/client.py", 998, "_make_api_call"]
    sock = [f"{_STDLIB}/socket.py", 5, "readinto"]
    notify = [f"{ROOT}/worker/jobs/steps/notify.py", 24, "notify"]
    ack = [f"{SITE}/kombu/transport/virtual/base.py", 678, "basic_ack"]
    stacks: list[list[Any]] = [
        [[loop, task, archive, boto, sock], 6],
        [[loop, task, archive], 2],
        [[loop, task, notify], 1],
        [[loop, task], 1],
        [[loop, ack], 2],
    ]
    assert step_of(stacks[0][0]) == "archive"
    assert step_of(stacks[3][0]) == "task wrapper (parse, context)"
    assert step_of(stacks[4][0]) == OUTSIDE_STEPS
    assert charged_group([loop, task, archive, boto, sock]) == "boto"
    lines = step_table(stacks, 12, 1200.0)
    assert lines[0].startswith("CPU by step")
    archive_row = next(line for line in lines if " archive " in line)
    assert "66.7%" in archive_row and "800 µs" in archive_row
    assert "boto 75%, worker 25%" in archive_row
    assert [line.split("µs")[1].split()[0] for line in lines[1:]] == [
        "archive",
        "notify",
        "task",
        "outside",
    ]
