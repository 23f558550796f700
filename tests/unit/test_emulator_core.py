"""The emulator's behaviour without HTTP, on a fake clock: lifecycle, capacity, faults."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from worker.devtools.emulator import Emulator, EmulatorConfig, FaultRule
from worker.devtools.emulator.faults import FaultPlan, parse_rate_key, validate_rates

MODEL = "/v1/models/bytedance/dreamina-4-0/text-to-image"
AUTH = "Bearer t"


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**config: Any) -> tuple[Emulator, Clock]:
    clock = Clock()
    settings = {"token": "t", "queue_s": 1.0, "run_s": 10.0, "capacity": 2, **config}
    return Emulator(EmulatorConfig(**settings), "http://emu", clock=clock), clock


def call(emu: Emulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = json.dumps(body).encode() if body is not None else b""
    reply = emu.handle(method, path, AUTH, raw)
    assert isinstance(reply.body, bytes)
    return reply.status, json.loads(reply.body)


def submit(emu: Emulator, **body: Any) -> str:
    status, answer = call(emu, "POST", MODEL, {"prompt": "a cat", **body})
    assert status == 200, answer
    return str(answer["request_id"])


def status_of(emu: Emulator, rid: str) -> dict[str, Any]:
    code, answer = call(emu, "GET", f"/v1/requests/{rid}/status")
    assert code == 200
    return dict(answer)


def test_timeline_with_capacity_two() -> None:
    emu, clock = make()
    ids = [submit(emu) for _ in range(4)]
    assert [status_of(emu, r)["queue_position"] for r in ids] == [0, 1, 2, 3]
    clock.now += 1.0  # queue_s passed: two slots fill
    states = [status_of(emu, r) for r in ids]
    assert [s["status"] for s in states] == ["in_progress", "in_progress", "in_queue", "in_queue"]
    assert [s.get("queue_position") for s in states[2:]] == [0, 1]
    clock.now += 10.0  # first two finish, next two start
    assert [status_of(emu, r)["status"] for r in ids] == [
        "completed",
        "completed",
        "in_progress",
        "in_progress",
    ]
    clock.now += 10.0
    assert all(status_of(emu, r)["status"] == "completed" for r in ids)


def test_late_submit_waits_for_a_free_slot_in_order() -> None:
    emu, clock = make(capacity=1, queue_s=0.0, run_s=5.0)
    first = submit(emu)
    clock.now += 1
    second = submit(emu)
    third = submit(emu)
    assert status_of(emu, first)["status"] == "in_progress"
    assert status_of(emu, third)["queue_position"] == 1
    clock.now += 4  # first ends at +5
    assert status_of(emu, second)["status"] == "in_progress"
    assert status_of(emu, third)["queue_position"] == 0
    clock.now += 5
    assert status_of(emu, third)["status"] == "in_progress"


def test_cancel_only_while_queued() -> None:
    emu, clock = make(capacity=1)
    running, queued = submit(emu), submit(emu)
    clock.now += 1.0
    assert call(emu, "POST", f"/v1/requests/{queued}/cancel") == (
        200,
        {"request_id": queued, "status": "cancelled"},
    )
    code, answer = call(emu, "POST", f"/v1/requests/{running}/cancel")
    assert code == 409
    assert "in progress" in answer["error"]["message"]
    clock.now += 10.0
    code, answer = call(emu, "POST", f"/v1/requests/{running}/cancel")
    assert code == 409
    assert "already finished" in answer["error"]["message"]
    # Cancelling again is idempotent, and a cancelled request never takes a slot.
    assert call(emu, "POST", f"/v1/requests/{queued}/cancel")[0] == 200
    assert emu.counters()["requests"] == {
        "in_queue": 0,
        "in_progress": 0,
        "completed": 1,
        "cancelled": 1,
        "failed": 0,
    }


def test_runtime_config_applies_to_new_requests() -> None:
    emu, clock = make(capacity=1, queue_s=0.0, run_s=100.0)
    old = submit(emu)
    emu.update_config(run_s=1.0, capacity=2)
    new = submit(emu)
    clock.now += 2.0
    assert status_of(emu, old)["status"] == "in_progress"
    assert status_of(emu, new)["status"] == "completed"


def test_spontaneous_cancel_and_failure() -> None:
    emu, clock = make(faults=[FaultRule(kind="cancel"), FaultRule(kind="fail")])
    cancelled, failed = submit(emu), submit(emu)
    assert status_of(emu, cancelled)["status"] == "in_queue"
    clock.now += 1.0
    assert status_of(emu, cancelled)["status"] == "cancelled"
    assert status_of(emu, failed)["status"] == "in_progress"
    clock.now += 10.0
    answer = status_of(emu, failed)
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "generation_failed"
    assert call(emu, "GET", f"/v1/requests/{failed}/result")[1] == answer
    assert emu.counters()["faults"] == {"cancel": 1, "fail": 1}


def test_rules_apply_in_order_and_run_out() -> None:
    plan = FaultPlan(
        [FaultRule(kind="429", endpoint="status", times=2), FaultRule(kind="500", times=None)],
        {},
        seed=0,
    )
    kinds = [f.kind if (f := plan.for_call("status")) else None for _ in range(4)]
    assert kinds == ["429", "429", "500", "500"]
    assert plan.for_new_request() is None


def test_rule_for_one_request_only() -> None:
    plan = FaultPlan([FaultRule(kind="503", endpoint="result", request_id="x")], {}, seed=0)
    assert plan.for_call("result", "y") is None
    fault = plan.for_call("result", "x")
    assert fault is not None
    assert fault.kind == "503"
    assert plan.for_call("result", "x") is None


def test_seeded_rates_are_reproducible() -> None:
    def sequence(seed: int) -> list[str | None]:
        plan = FaultPlan([], {"500": 0.2, "429@status": 0.2, "fail": 0.5}, seed=seed)
        out: list[str | None] = []
        for _ in range(200):
            fault = plan.for_call("status")
            out.append(fault.kind if fault else None)
            out.append(plan.for_new_request())
        return out

    first = sequence(7)
    assert first == sequence(7)
    assert first != sequence(8)
    assert {"500", "429", "fail", None} <= set(first)
    hits = first[0::2].count("500")
    assert 20 <= hits <= 60  # about 20 % of 200


def test_rates_scoped_to_an_endpoint() -> None:
    plan = FaultPlan([], {"503@result": 1.0}, seed=1)
    assert plan.for_call("status") is None
    fault = plan.for_call("result")
    assert fault is not None
    assert fault.kind == "503"


def test_output_404_on_download_acts_per_call() -> None:
    plan = FaultPlan([FaultRule(kind="output_404", endpoint="download")], {}, seed=0)
    assert plan.for_new_request() is None
    fault = plan.for_call("download")
    assert fault is not None
    assert fault.kind == "output_404"


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({"boom": 0.1}, "unknown fault kind"),
        ({"500@nowhere": 0.1}, "unknown endpoint"),
        ({"500": 1.5}, "between 0 and 1"),
        ({"500": 0.6, "503": 0.6}, "add up"),
        ({"fail": 0.7, "cancel": 0.7}, "per-request"),
        ({"fail@status": 0.1}, "decided at submit"),
    ],
)
def test_bad_rates_are_refused(rates: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_rates(rates)


def test_rate_key_parsing() -> None:
    assert parse_rate_key("slow") == ("slow", "any")
    assert parse_rate_key("reset@download") == ("reset", "download")


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValidationError):
        FaultRule(kind="fail", endpoint="status")
    with pytest.raises(ValidationError):
        FaultRule(kind="teapot")
    with pytest.raises(ValidationError):
        FaultRule(kind="429", times=0)


def test_config_update_validates() -> None:
    emu, _ = make()
    with pytest.raises(ValidationError):
        emu.update_config(images_per_set=9)
    with pytest.raises(ValidationError):
        emu.update_config(no_such_field=1)
    assert emu.config.images_per_set == 2
    assert emu.update_config(images_per_set=4).images_per_set == 4


def test_reset_restores_initial_state() -> None:
    emu, _ = make(faults=[FaultRule(kind="500", endpoint="status")])
    rid = submit(emu)
    emu.update_config(run_s=99.0)
    emu.set_faults([])
    emu.reset()
    assert emu.config.run_s == 10.0
    assert call(emu, "GET", f"/v1/requests/{rid}/status")[0] == 500  # the rule is back
    assert call(emu, "GET", f"/v1/requests/{rid}/status")[0] == 404  # request forgotten
    counters = emu.counters()
    assert counters["status_calls"] == 2
    assert counters["submits"] == 0


def test_public_dump_masks_token() -> None:
    assert EmulatorConfig(token="secret").public_dump()["token"] == "***"
    assert EmulatorConfig().public_dump()["token"] is None


def test_run_sigma_spreads_run_times_lognormally_around_run_s() -> None:
    fixed = Emulator(EmulatorConfig(run_s=10.0), "http://e")
    assert {fixed._run_time(fixed._config) for _ in range(5)} == {10.0}
    spread = Emulator(EmulatorConfig(run_s=10.0, run_sigma=0.3, seed=4), "http://e")
    drawn = [spread._run_time(spread._config) for _ in range(2001)]
    times = sorted(drawn)
    assert times[1000] == pytest.approx(10.0, rel=0.05)  # the median
    assert times[1900] / times[1000] == pytest.approx(math.exp(0.3 * 1.645), rel=0.1)
    again = Emulator(EmulatorConfig(run_s=10.0, run_sigma=0.3, seed=4), "http://e")
    assert [again._run_time(again._config) for _ in range(3)] == drawn[:3]  # seeded


def test_queue_extra_s_adds_exponential_waits_and_starts_requests_as_they_end() -> None:
    emu, clock = make(queue_s=1.0, queue_extra_s=5.0, capacity=1000, seed=7)
    ids = [submit(emu) for _ in range(400)]
    clock.now += 10_000.0
    timelines = emu.timelines()
    starts = [(timelines[i][1], timelines[i][0]) for i in ids]
    assert all(start is not None for start, _ in starts)  # 10,000 s on: every one started
    waits = sorted(start - submitted for start, submitted in starts if start is not None)
    assert waits[0] >= 1.0  # never under queue_s
    assert sum(waits) / len(waits) == pytest.approx(6.0, rel=0.15)  # queue_s + mean 5 s
    assert waits[len(waits) // 2] == pytest.approx(1.0 + 5.0 * math.log(2), rel=0.2)  # median
    # Nobody waits behind a longer wait: each request starts when its own wait ends.
    assert all(
        start == pytest.approx(submitted + request.queue_s)
        for request in emu._scheduler.all()
        for submitted, start in [(request.submitted_at, request.started_at)]
    )


def test_queue_position_counts_requests_whose_wait_ends_first() -> None:
    emu, _ = make(queue_s=2.0, capacity=1)
    first = submit(emu)
    emu.update_config(queue_s=0.5)
    second = submit(emu)  # its wait ends before the first one's: it is ahead
    assert status_of(emu, second)["queue_position"] == 0
    assert status_of(emu, first)["queue_position"] == 1
