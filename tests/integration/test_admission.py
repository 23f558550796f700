"""The waiting room on a real Redis: caps, fairness across tenants, priorities without
starvation, the token bucket, the shared cooldown and the account circuit."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis

from api_contracts.jobs import JobRequest
from worker.jobs.admission import SLOTS_KEY, RedisAdmission

pytestmark = pytest.mark.integration


def req(tenant: str | None = None, priority: str = "normal") -> JobRequest:
    data: dict[str, object] = {"input": {"prompt": "x"}, "priority": priority}
    if tenant:
        data["tenant"] = tenant
    return JobRequest.model_validate(data)


def make(
    client: redis.Redis,
    *,
    cap: int | None = 3,
    tenant_cap: int | None = None,
    rate: float | None = None,
    probe_s: float = 60.0,
) -> RedisAdmission:
    client.flushdb()
    return RedisAdmission(
        client,
        max_concurrency=cap,
        tenant_max_concurrency=tenant_cap,
        max_submits_per_s=rate,
        probe_interval_s=probe_s,
    )


def test_the_cap_holds_and_a_released_slot_goes_to_the_next(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=3)
    requests = {f"j{i}": req() for i in range(5)}
    for job_id, r in requests.items():
        assert adm.enter(job_id, r) == 1
    assert adm.enter("j0", requests["j0"]) == 0  # idempotent
    assert adm.admit(time.time()) == ["j0", "j1", "j2"]
    assert adm.admit(time.time()) == []  # full
    assert adm.enter("j0", requests["j0"]) == 2  # holds a slot
    assert adm.position("j4", requests["j4"]) == 1
    assert adm.release("j1", requests["j1"]) is True
    assert adm.release("j1", requests["j1"]) is False
    assert adm.admit(time.time()) == ["j3"]
    assert sorted(adm.holders()) == ["j0", "j2", "j3"]


def test_tenants_take_turns_whatever_the_size_of_their_batch(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=6)
    for i in range(100):
        adm.enter(f"big{i}", req("big"))
    adm.enter("small0", req("small"))
    adm.enter("tiny0", req("tiny"))
    admitted = adm.admit(time.time())
    assert len(admitted) == 6
    # the two small tenants' single jobs go in the first round, not after 100 big ones
    assert "small0" in admitted[:3] and "tiny0" in admitted[:3]


def test_a_tenant_at_its_cap_waits_while_others_go(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=10, tenant_cap=2)
    for i in range(5):
        adm.enter(f"a{i}", req("a"))
    adm.enter("b0", req("b"))
    admitted = adm.admit(time.time())
    assert sorted(admitted) == ["a0", "a1", "b0"]
    assert adm.admit(time.time()) == []
    adm.release("a0", req("a"))
    assert adm.admit(time.time()) == ["a2"]


def test_priorities_high_first_but_low_is_never_starved(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=None)
    for i in range(50):
        adm.enter(f"h{i}", req(priority="high"))
        adm.enter(f"n{i}", req(priority="normal"))
        adm.enter(f"l{i}", req(priority="low"))
    admitted = adm.admit(time.time(), at_most=22)
    kinds = Counter(job_id[0] for job_id in admitted)
    assert kinds == {"h": 16, "n": 4, "l": 2}  # weights 8:2:1, two rounds
    assert admitted[0].startswith("h")


def test_cancelled_waiting_jobs_are_skipped(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=1)
    adm.enter("gone", req())
    adm.enter("next", req())
    adm.leave("gone")
    assert adm.admit(time.time()) == ["next"]


def test_the_token_bucket_spaces_submits_fleet_wide(redis_client: redis.Redis) -> None:
    adm = make(redis_client, rate=5.0)
    taken = [adm.take_token() for _ in range(8)]
    assert taken[:5] == [0, 0, 0, 0, 0]  # a burst of one second's worth
    assert all(0 < wait <= 200 for wait in taken[5:])
    time.sleep(0.25)
    assert adm.take_token() == 0


def test_a_429_cooldown_is_shared_and_never_shortened(redis_client: redis.Redis) -> None:
    adm = make(redis_client)
    other_worker = make_view(redis_client, adm)
    assert adm.cooldown_ms() == 0
    adm.start_cooldown(2.0)
    adm.start_cooldown(0.5)
    assert 1500 < other_worker.cooldown_ms() <= 2000
    circuit, left = other_worker.gate()  # what a submit asks first, in one round trip
    assert circuit == "closed" and 1500 < left <= 2000


def make_view(client: redis.Redis, like: RedisAdmission) -> RedisAdmission:
    """Another worker's view of the same Redis (no flush)."""
    return RedisAdmission(
        client,
        max_concurrency=like.max_concurrency,
        tenant_max_concurrency=like.tenant_max,
        max_submits_per_s=like.rate,
        probe_interval_s=like.probe_interval_s,
    )


def test_the_account_circuit_opens_then_half_opens_one_job_at_a_time(
    redis_client: redis.Redis,
) -> None:
    adm = make(redis_client, cap=None, probe_s=0.3)
    for i in range(4):
        adm.enter(f"j{i}", req())
    assert adm.gate() == ("closed", 0)
    adm.pause("400002", "insufficient balance", now=time.time())
    assert adm.circuit() == "open"
    assert adm.gate() == ("open", 0)
    pause = adm.paused()
    assert pause is not None and pause.code == "400002"
    assert adm.admit(time.time()) == []
    time.sleep(0.35)
    assert adm.circuit() == "probing"
    assert adm.gate() == ("probing", 0)
    assert adm.admit(time.time()) == ["j0"]  # one probe
    assert adm.admit(time.time()) == []  # while it is out, nobody else
    adm.submitted()  # the probe got through: closed
    assert adm.circuit() == "closed" and adm.paused() is None
    adm.release("j0", req())
    assert adm.admit(time.time()) == ["j1", "j2", "j3"]


def test_resume_closes_the_circuit_at_once(redis_client: redis.Redis) -> None:
    adm = make(redis_client, cap=None)
    adm.pause("401", "bad token", now=time.time())
    adm.resume()
    assert adm.circuit() == "closed"
    assert redis_client.zcard(SLOTS_KEY) == 0
