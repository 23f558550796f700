"""``runcomfy-worker reconcile`` against a real Redis: lists what is stuck, then fixes it."""

from __future__ import annotations

import json
import time

import pytest
import redis
from click.testing import CliRunner

from api_contracts.jobs import JobRequest
from api_contracts.messages import QUEUE_SUBMIT
from worker.cli import main
from worker.devtools.embedded import EmbeddedRedis
from worker.jobs.store import RedisJobStore

pytestmark = pytest.mark.integration


def test_reconcile_lists_then_resubmits_a_record_without_a_message(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    redis_client.flushdb()
    store = RedisJobStore(redis_client, ttl_s=600, submit_grace_s=0.01)
    store.create_if_absent("stuck1", JobRequest.model_validate({"input": {"prompt": "x"}}))
    env = {"REDIS_URL": redis_server.url, "SUBMIT_GRACE_S": "0.01"}
    runner = CliRunner()

    time.sleep(0.05)  # past SUBMIT_GRACE_S
    dry = runner.invoke(main, ["reconcile", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    [item] = json.loads(dry.stdout)
    assert (item["job_id"], item["status"], item["action"]) == ("stuck1", "queued", "resubmit")
    assert item["reason"] == "submit message never ran"
    assert redis_client.llen(QUEUE_SUBMIT) == 0
    assert store.load("stuck1").seq == 0

    fixed = runner.invoke(main, ["reconcile"], env=env)
    assert fixed.exit_code == 0, fixed.output
    assert "did resubmit" in fixed.stdout
    assert redis_client.llen(QUEUE_SUBMIT) == 1
    assert store.load("stuck1").seq == 1
    # nothing overdue any more until grace + interval have passed
    again = runner.invoke(main, ["reconcile", "--json"], env=env)
    assert json.loads(again.stdout) == []


def test_reconcile_without_redis_is_a_clear_error() -> None:
    done = CliRunner().invoke(main, ["reconcile"], env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.exit_code == 1
    assert "cannot reach Redis" in done.output


def test_the_pass_lock_admits_one_pass_per_interval_whoever_asks(
    redis_client: redis.Redis,
) -> None:
    from worker.jobs.reconcile import redis_lock

    redis_client.flushdb()
    lock = redis_lock(redis_client)
    assert lock.take("a", 30) is True
    assert lock.take("a", 30) is False  # not even its holder: one pass at a time
    assert lock.take("b", 30) is False
    lock.release("b", 0)  # not b's: nothing happens
    assert lock.take("b", 30) is False
    lock.release("a", 0.3)  # the pass is over; the rest of its period is 0.3 s
    assert 0 < redis_client.pttl("rcw:reconcile:lock") <= 300
    assert lock.take("b", 30) is False
    time.sleep(0.35)  # expired, holder alive or not
    assert lock.take("b", 30) is True
    lock.release("b", -1.0)  # a pass longer than its period frees the lock at once
    assert lock.take("a", 30) is True


def test_a_wake_pass_renews_its_short_hold_only_while_it_owns_the_lock(
    redis_client: redis.Redis,
) -> None:
    from worker.constants import WAKE_LOCK_KEY
    from worker.jobs.reconcile import redis_lock

    redis_client.flushdb()
    lock = redis_lock(redis_client, WAKE_LOCK_KEY)
    assert lock.take("a", 0.2) is True
    assert lock.renew("b", 3.0) is False  # not b's
    assert 0 < redis_client.pttl(WAKE_LOCK_KEY) <= 200
    assert lock.renew("a", 3.0) is True
    assert 2_000 < redis_client.pttl(WAKE_LOCK_KEY) <= 3_000
    redis_client.delete(WAKE_LOCK_KEY)  # expired (its holder stalled past its hold)
    assert lock.renew("a", 3.0) is False  # a stalled pass learns it lost the lock
    assert redis_client.exists(WAKE_LOCK_KEY) == 0


@pytest.mark.parametrize(
    ("policy", "allowed", "refused"),
    [
        ("noeviction", False, False),
        ("allkeys-lru", False, True),
        ("volatile-ttl", False, True),
        ("allkeys-lru", True, False),
    ],
)
def test_a_worker_refuses_a_redis_that_may_evict(
    redis_client: redis.Redis, policy: str, allowed: bool, refused: bool
) -> None:
    from worker.errors import ConfigError
    from worker.queueing.run import check_redis_eviction

    redis_client.config_set("maxmemory-policy", policy)
    try:
        if refused:
            with pytest.raises(ConfigError, match=f"maxmemory-policy is '{policy}'"):
                check_redis_eviction(redis_client, allowed=allowed)
        else:
            check_redis_eviction(redis_client, allowed=allowed)
    finally:
        redis_client.config_set("maxmemory-policy", "noeviction")


def test_an_unreachable_redis_is_not_a_reason_to_refuse_to_start() -> None:
    from worker.queueing.run import check_redis_eviction

    client = redis.Redis(port=1, socket_connect_timeout=0.5)
    check_redis_eviction(client, allowed=False)  # logged, not raised
