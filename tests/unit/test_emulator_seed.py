"""``Emulator.seed``: requests registered as already running, without a submit each."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_emulator_core import MODEL, call, make
from worker.devtools.emulator import Emulator


def state(emu: Emulator, request_id: str) -> str:
    code, answer = call(emu, "GET", f"/v1/requests/{request_id}/status")
    assert code == 200, answer
    return str(answer["status"])


def test_seeded_requests_run_at_once_past_capacity_and_end_after_their_run_time() -> None:
    emu, clock = make(capacity=2)
    ids = [f"seeded-{i}" for i in range(5)]
    assert emu.seed(ids, run_s=100.0) == 5
    assert [state(emu, r) for r in ids] == ["in_progress"] * 5
    counters = emu.counters()
    assert counters["submits"] == 0  # no call counted for seeding
    assert counters["requests"]["in_progress"] == 5
    assert counters["max_in_upstream"] == 5
    # They hold their slots: a submit queues behind them until they end.
    code, answer = call(emu, "POST", MODEL, {"prompt": "a cat"})
    assert code == 200
    submitted = str(answer["request_id"])
    clock.now += 50.0
    assert state(emu, submitted) == "in_queue"
    clock.now += 50.0
    assert [state(emu, r) for r in ids] == ["completed"] * 5
    assert state(emu, submitted) == "in_progress"
    code, result = call(emu, "GET", f"/v1/requests/{ids[0]}/result")
    assert code == 200 and result["output"]["image"].endswith(f"/files/{ids[0]}/0.png")


def test_seed_defaults_to_the_configured_run_time_and_can_start_in_the_past() -> None:
    emu, clock = make(run_s=30.0)
    emu.seed(["a"])
    emu.seed(["b"], started_s_ago=25.0)
    timelines = emu.timelines()
    assert timelines["a"] == (1000.0, 1000.0, 1030.0)
    assert timelines["b"] == (975.0, 975.0, 1005.0)
    clock.now += 6.0
    assert (state(emu, "a"), state(emu, "b")) == ("in_progress", "completed")


def test_seeded_requests_count_towards_max_concurrent() -> None:
    emu, _ = make(max_concurrent=3, capacity=10)
    emu.seed(["a", "b", "c"], run_s=60.0)
    code, answer = call(emu, "POST", MODEL, {"prompt": "a cat"})
    assert code == 429 and answer["error"]["reason"] == "concurrency"


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (["x", "x"], {}, "distinct"),
        (["known"], {}, "already known"),
        (["y"], {"run_s": -1.0}, "run_s"),
        (["y"], {"started_s_ago": float("nan")}, "started_s_ago"),
    ],
)
def test_bad_seeds_are_refused_and_seed_nothing(
    ids: list[str], kwargs: dict[str, Any], message: str
) -> None:
    emu, _ = make()
    emu.seed(["known"])
    with pytest.raises(ValueError, match=message):
        emu.seed(ids, **kwargs)
    assert emu.counters()["requests"]["in_progress"] == 1
