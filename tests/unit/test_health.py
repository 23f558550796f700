"""The heartbeat file: writer, verdicts, the healthcheck command, and the bootstep wiring."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner

from worker.health import (
    HEARTBEAT_FILE_ENV,
    Heartbeat,
    HeartbeatStep,
    check_heartbeat,
    healthcheck_command,
    install_heartbeat,
)

NOW = 1_800_000_000.0


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def write_record(path: Path, *, age_s: float = 1.0, **record: Any) -> Path:
    """A heartbeat file whose mtime is ``age_s`` before NOW."""
    body = {"pid": 1, "written_at": NOW - age_s, "consuming": True, "loop_at": NOW - age_s}
    body.update(record)
    path.write_text(json.dumps(body))
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("record", "ready", "ok", "reason"),
    [
        ({}, False, True, "ok: heartbeat 1s old, consuming"),
        ({}, True, True, "ok: heartbeat 1s old, consuming"),
        ({"age_s": 61}, False, False, "heartbeat is 61s old (max 60s): worker hung or gone"),
        ({"consuming": False}, False, True, "ok: heartbeat 1s old, not consuming"),
        ({"consuming": False}, True, False, "worker is not consuming"),
        ({"loop_at": NOW - 300}, False, False, "event loop last ran 300s ago (max 60s)"),
        # A wedged loop only matters while consuming: reconnecting has no loop to run.
        ({"consuming": False, "loop_at": NOW - 300}, False, True, "ok"),
        ({"loop_at": None}, True, True, "ok"),
    ],
)
def test_check_heartbeat(
    tmp_path: Path, record: dict[str, Any], ready: bool, ok: bool, reason: str
) -> None:
    path = write_record(tmp_path / "hb", **record)
    result = check_heartbeat(path, 60, require_consuming=ready, now=NOW)
    assert result.ok is ok
    assert result.reason.startswith(reason)


def test_check_heartbeat_missing_and_garbage(tmp_path: Path) -> None:
    missing = check_heartbeat(tmp_path / "nope", now=NOW)
    assert not missing.ok
    assert "no heartbeat file" in missing.reason

    garbage = tmp_path / "garbage"
    garbage.write_text("{not json")
    os.utime(garbage, (NOW, NOW))
    assert not check_heartbeat(garbage, now=NOW).ok

    listed = tmp_path / "list"
    listed.write_text("[]")
    os.utime(listed, (NOW, NOW))
    assert "not a JSON object" in check_heartbeat(listed, now=NOW).reason


# --------------------------------------------------------------------------- the command


def test_healthcheck_command_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "hb"
    path.write_text(json.dumps({"consuming": True, "loop_at": time.time()}))

    fresh = runner.invoke(healthcheck_command, ["--file", str(path)])
    assert fresh.exit_code == 0, fresh.output
    assert fresh.output.startswith("ok:")

    old = time.time() - 120
    os.utime(path, (old, old))
    stale = runner.invoke(healthcheck_command, ["--file", str(path), "--max-age", "60"])
    assert stale.exit_code == 1
    assert len(stale.output.strip().splitlines()) == 1
    assert "old (max 60s)" in stale.output


def test_healthcheck_command_reads_env_and_ready_flag(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    path.write_text(json.dumps({"consuming": False, "loop_at": None}))
    runner = CliRunner()
    env = {HEARTBEAT_FILE_ENV: str(path)}

    assert runner.invoke(healthcheck_command, [], env=env).exit_code == 0
    unready = runner.invoke(healthcheck_command, ["--ready"], env=env)
    assert unready.exit_code == 1
    assert "not consuming" in unready.output


def test_healthcheck_command_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HEARTBEAT_FILE_ENV, raising=False)
    result = CliRunner().invoke(healthcheck_command, [])
    assert result.exit_code == 1
    assert HEARTBEAT_FILE_ENV in result.output


# --------------------------------------------------------------------------- the writer


def test_heartbeat_writes_periodically_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    beat = Heartbeat(path, interval_s=0.01)
    beat.start()
    beat.start()  # idempotent: still one thread
    try:
        assert json.loads(path.read_text())["consuming"] is False, "written at once on start"
        beat.set_consuming(True)
        wait_until(lambda: json.loads(path.read_text())["consuming"] is True)
        first = json.loads(path.read_text())["written_at"]
        wait_until(lambda: json.loads(path.read_text())["written_at"] > first)
        assert sum(t.name == "heartbeat" for t in threading.enumerate()) == 1
    finally:
        beat.stop()
    assert not any(t.name == "heartbeat" for t in threading.enumerate())
    record = json.loads(path.read_text())
    assert record["consuming"] is False, "the last record says the worker stopped consuming"
    assert record["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == [path], "no temporary files left behind"


def test_heartbeat_records_loop_ticks() -> None:
    clock = iter([10.0, 20.0, 30.0]).__next__
    beat = Heartbeat("/nonexistent/hb", interval_s=1, clock=clock)
    beat.set_consuming(True)  # 10.0
    assert beat.snapshot()["loop_at"] == 10.0  # snapshot reads the clock too: 20.0
    beat.loop_tick()  # 30.0
    assert beat._loop_at == 30.0


def test_heartbeat_write_failure_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.health")
    beat = Heartbeat(tmp_path / "missing-dir" / "hb", interval_s=1)
    beat.write()
    beat.write()
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1


def test_heartbeat_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Heartbeat("hb", interval_s=0)


# --------------------------------------------------------------------------- the bootstep


def test_install_heartbeat_adds_one_configured_step(tmp_path: Path) -> None:
    app = Celery("health-test", set_as_current=False)
    install_heartbeat(app, str(tmp_path / "a"), interval_s=5)
    install_heartbeat(app, str(tmp_path / "b"), interval_s=2)
    steps = [s for s in app.steps["consumer"] if issubclass(s, HeartbeatStep)]
    assert len(steps) == 1, "installing again replaces the step"
    (step,) = steps
    assert step.path == str(tmp_path / "b")
    assert step.interval_s == 2.0
    assert "celery.worker.consumer.tasks:Tasks" in step.requires


class FakeEntry:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimer:
    """Records call_repeatedly like kombu's timer; the test fires the callbacks."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None], FakeEntry]] = []

    def call_repeatedly(self, secs: float, fun: Callable[[], None]) -> FakeEntry:
        entry = FakeEntry()
        self.calls.append((secs, fun, entry))
        return entry


def test_step_lifecycle_with_a_fake_consumer(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    app = Celery("health-test", set_as_current=False)
    install_heartbeat(app, str(path), interval_s=30)
    (step_cls,) = [s for s in app.steps["consumer"] if issubclass(s, HeartbeatStep)]
    consumer = type("Consumer", (), {"timer": FakeTimer()})()

    step = step_cls(consumer)  # built with the consumer: alive before connecting
    try:
        assert json.loads(path.read_text())["consuming"] is False
        step.start(consumer)
        step.heartbeat.write()
        assert json.loads(path.read_text())["consuming"] is True
        ((secs, tick, entry),) = consumer.timer.calls
        assert secs == 30
        tick()  # what the event loop does every interval

        step.stop(consumer)  # connection lost: unready, still writing
        assert entry.cancelled
        step.heartbeat.write()
        assert json.loads(path.read_text())["consuming"] is False

        step.start(consumer)  # reconnected
        assert len(consumer.timer.calls) == 2
    finally:
        step.shutdown(consumer)
    assert consumer.timer.calls[1][2].cancelled
    assert not any(t.name == "heartbeat" for t in threading.enumerate())


def test_bare_step_refuses_to_run_without_a_path() -> None:
    with pytest.raises(RuntimeError, match="install_heartbeat"):
        HeartbeatStep(object())
