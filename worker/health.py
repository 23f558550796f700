"""Liveness and readiness without ``celery inspect ping``: a heartbeat file.

``celery inspect ping`` costs seconds of CPU, round-trips through the broker, and so fails
(and restarts healthy workers) whenever Redis is briefly away. Instead, a consumer bootstep
keeps a small JSON file fresh:

- a daemon thread in the worker's main process rewrites it every ``interval_s``, from the
  moment the consumer is built until the worker shuts down, so its age says "the process is
  alive", also while it is (re)connecting to the broker;
- the file says whether the consumer is consuming, and when the worker's event loop last ran
  a timer callback, so a wedged loop shows up as a stale ``loop_at`` even though the thread
  keeps writing.

``runcomfy-worker healthcheck`` reads it: liveness by default (alive, loop not wedged) and
``--ready`` for readiness (also consuming). A broker outage makes a worker unready, never dead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import celery
import click
from celery import bootsteps

log = logging.getLogger(__name__)

HEARTBEAT_FILE_ENV: Final = "WORKER_HEARTBEAT_FILE"
DEFAULT_MAX_AGE_S: Final = 60.0


class Heartbeat:
    """Keeps the heartbeat file fresh from a daemon thread; the worker reports into it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.path = Path(path)
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # One writer at a time: the thread and stop() share the temporary file name.
        self._write_lock = threading.Lock()
        self._consuming = False
        self._loop_at: float | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_failed = False

    def start(self) -> None:
        """Write once now and start the writer thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.write()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and leave a last record saying the worker is not consuming."""
        self.set_consuming(False)
        self._stopped.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self.write()

    def set_consuming(self, consuming: bool) -> None:
        """Record whether the consumer is taking messages (readiness)."""
        with self._lock:
            self._consuming = consuming
            if consuming:
                # A fresh start counts as the loop running; the timer keeps it current after.
                self._loop_at = self._clock()

    def loop_tick(self) -> None:
        """Called from the worker's event loop: proves the loop is not wedged."""
        with self._lock:
            self._loop_at = self._clock()

    def snapshot(self) -> dict[str, Any]:
        """The record written to the file."""
        with self._lock:
            return {
                "pid": os.getpid(),
                "written_at": self._clock(),
                "consuming": self._consuming,
                "loop_at": self._loop_at,
            }

    def write(self) -> None:
        """Replace the file atomically, so a reader never sees half a record."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with self._write_lock:
                tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError as exc:
            # Keep running: the stale file makes the probe fail, which is the right signal.
            if not self._write_failed:
                log.warning("heartbeat: cannot write %s: %s", self.path, exc)
            self._write_failed = True
        else:
            self._write_failed = False

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.write()


class HeartbeatStep(bootsteps.StartStopStep):
    """Consumer bootstep driving a :class:`Heartbeat`; configured by :func:`install_heartbeat`."""

    # Starts after the task consumer, so "consuming" means queues are being consumed.
    requires = ("celery.worker.consumer.tasks:Tasks",)
    path: ClassVar[str] = ""
    interval_s: ClassVar[float] = 10.0

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        if not self.path:
            raise RuntimeError("HeartbeatStep has no path: add it with install_heartbeat()")
        self.heartbeat = Heartbeat(self.path, self.interval_s)
        self._timer_entry: Any = None
        # Start writing now, before the first broker connection, so a worker that cannot
        # reach Redis at start-up is reported alive-but-unready rather than dead.
        self.heartbeat.start()

    def start(self, parent: Any) -> None:
        """The consumer is consuming: mark ready and tick from the event loop's timer."""
        self.heartbeat.set_consuming(True)
        self._cancel_timer()
        self._timer_entry = parent.timer.call_repeatedly(self.interval_s, self.heartbeat.loop_tick)

    def stop(self, parent: Any) -> None:
        """Connection lost or shutting down: no longer consuming (the thread keeps writing)."""
        self.heartbeat.set_consuming(False)
        self._cancel_timer()

    def shutdown(self, parent: Any) -> None:
        """The worker is going away: stop the writer thread."""
        self.stop(parent)
        self.heartbeat.stop()

    def _cancel_timer(self) -> None:
        entry, self._timer_entry = self._timer_entry, None
        if entry is not None:
            entry.cancel()


def install_heartbeat(app: celery.Celery, path: str, interval_s: float = 10.0) -> None:
    """Make workers of ``app`` keep the heartbeat file at ``path`` fresh (call before start)."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    consumer_steps = app.steps["consumer"]
    # Installing twice (tests, re-imports) replaces the earlier configuration.
    for step in [s for s in consumer_steps if isinstance(s, type) and issubclass(s, HeartbeatStep)]:
        consumer_steps.discard(step)
    step_cls = type(
        "HeartbeatStep", (HeartbeatStep,), {"path": path, "interval_s": float(interval_s)}
    )
    consumer_steps.add(step_cls)


@dataclass(frozen=True)
class HealthResult:
    """The verdict of :func:`check_heartbeat` and the one-line reason shown to the prober."""

    ok: bool
    reason: str


def check_heartbeat(
    path: str | os.PathLike[str],
    max_age_s: float = DEFAULT_MAX_AGE_S,
    *,
    require_consuming: bool = False,
    now: float | None = None,
) -> HealthResult:
    """Judge the heartbeat file: fresh, event loop recent, and (for readiness) consuming."""
    now = time.time() if now is None else now
    file = Path(path)
    try:
        age = now - file.stat().st_mtime
        record = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return HealthResult(False, f"no heartbeat file at {file}: worker not started")
    except (OSError, ValueError) as exc:
        return HealthResult(False, f"cannot read heartbeat file {file}: {exc}")
    if age > max_age_s:
        return HealthResult(
            False, f"heartbeat is {age:.0f}s old (max {max_age_s:.0f}s): worker hung or gone"
        )
    if not isinstance(record, dict):
        return HealthResult(False, f"heartbeat file {file} is not a JSON object")
    consuming = record.get("consuming") is True
    loop_at = record.get("loop_at")
    if consuming and isinstance(loop_at, int | float) and now - loop_at > max_age_s:
        return HealthResult(
            False,
            f"event loop last ran {now - loop_at:.0f}s ago (max {max_age_s:.0f}s): worker wedged",
        )
    if require_consuming and not consuming:
        return HealthResult(False, "worker is not consuming (connecting to Redis or shutting down)")
    state = "consuming" if consuming else "not consuming"
    return HealthResult(True, f"ok: heartbeat {age:.0f}s old, {state}")


@click.command("healthcheck")
@click.option(
    "--file",
    "path",
    envvar=HEARTBEAT_FILE_ENV,
    type=click.Path(dir_okay=False),
    help=f"Heartbeat file the worker writes [env {HEARTBEAT_FILE_ENV}].",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_AGE_S,
    show_default=True,
    help="Seconds after which the heartbeat counts as stale.",
)
@click.option("--ready", is_flag=True, help="Readiness: also require the worker to be consuming.")
@click.pass_context
def healthcheck_command(ctx: click.Context, path: str | None, max_age: float, ready: bool) -> None:
    """Exit 0 if the worker's heartbeat file is fresh, else 1 with a one-line reason."""
    if not path:
        click.echo(
            f"no heartbeat file configured: pass --file or set {HEARTBEAT_FILE_ENV}", err=True
        )
        ctx.exit(1)
    result = check_heartbeat(path, max_age, require_consuming=ready)
    if result.ok and ready:
        result = _account_readiness(result)
    click.echo(result.reason, err=not result.ok)
    ctx.exit(0 if result.ok else 1)


def _account_readiness(result: HealthResult) -> HealthResult:
    """Readiness also says when submissions are paused fleet-wide, and why. Redis being
    unreachable is not reported here: the heartbeat already says "not consuming" then."""
    import redis  # noqa: PLC0415 - only --ready needs Redis; liveness must stay file-only

    from worker.jobs.admission import RedisAdmission  # noqa: PLC0415 - as above
    from worker.services.redis_client import make_redis  # noqa: PLC0415 - as above
    from worker.settings import load_settings  # noqa: PLC0415 - as above

    try:
        settings = load_settings()
        client = make_redis(settings.redis, socket_timeout=2, connect_timeout=2)
        try:
            pause = RedisAdmission(
                client,
                max_concurrency=None,
                tenant_max_concurrency=None,
                max_submits_per_s=None,
                probe_interval_s=settings.runcomfy.account_probe_s,
            ).paused()
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return result
    if pause is None:
        return result
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pause.since))
    return HealthResult(
        False,
        f"not ready: submissions paused fleet-wide since {since} by an account error "
        f"({pause.code}: {pause.message}); jobs stay queued; `runcomfy-worker resume` "
        "or the next probe closes it",
    )
