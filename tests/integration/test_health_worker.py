"""The heartbeat bootstep inside a real Celery worker on a real Redis, including an outage."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery, _state
from celery.contrib.testing.worker import start_worker

from worker.devtools.embedded import EmbeddedRedis
from worker.health import check_heartbeat, install_heartbeat

pytestmark = pytest.mark.integration


def wait_until(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis this test may stop and restart (the session one is shared)."""
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture
def restore_celery_state() -> Iterator[None]:
    """start_worker makes its app the default/current one and sets up logging (root level
    ERROR): undo both for later tests."""
    # celery-types does not declare these two module attributes.
    default, current = _state.default_app, _state.get_current_app()  # type: ignore[attr-defined]
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    _state.set_default_app(default)
    _state._set_current_app(current)  # type: ignore[attr-defined]
    root.setLevel(level)
    root.handlers[:] = handlers


def record(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


# `@app.task` defaults to shared=True: tasks of every service app built earlier in the session
# are added to this app too when it is finalized, which warns about their duplicate names.
@pytest.mark.usefixtures("restore_celery_state")
def test_worker_heartbeat_tracks_consuming_across_a_broker_outage(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    app = Celery("heartbeat-test", broker=own_redis.url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
    )
    path = tmp_path / "heartbeat"
    install_heartbeat(app, str(path), interval_s=0.05)

    restarted: EmbeddedRedis | None = None
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            wait_until(lambda: path.exists() and record(path)["consuming"] is True)
            first_tick = float(record(path)["loop_at"])  # type: ignore[arg-type]
            # The event loop's timer keeps ticking while the worker runs.
            wait_until(lambda: float(record(path)["loop_at"]) > first_tick)  # type: ignore[arg-type]
            assert check_heartbeat(path, 5, require_consuming=True).ok

            own_redis.close()  # broker outage: alive but not ready
            wait_until(lambda: record(path)["consuming"] is False)
            written = record(path)["written_at"]
            wait_until(lambda: record(path)["written_at"] != written)
            assert check_heartbeat(path, 5).ok, "liveness must survive a broker outage"
            assert not check_heartbeat(path, 5, require_consuming=True).ok

            restarted = EmbeddedRedis(port=own_redis.port).start()
            wait_until(lambda: record(path)["consuming"] is True)
            assert check_heartbeat(path, 5, require_consuming=True).ok
    finally:
        if restarted is not None:
            restarted.close()

    # Worker stopped: the writer thread is gone and the last record says not consuming.
    assert not any(t.name == "heartbeat" for t in threading.enumerate())
    assert record(path)["consuming"] is False
