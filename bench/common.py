"""What every figure shares: the stack (Redis, S3, emulator, receiver), workers, RSS, rows.

Servers bind to 127.0.0.1 only. moto runs as its own process so the S3 side does not share
this process's GIL with the emulator and the webhook receiver, which run here as threads
(their counters and clocks are read directly).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from worker.devtools.embedded import (
    EmbeddedRedis,
    EmbeddedS3,
    WorkerProcess,
    free_port,
    wait_for_port,
)
from worker.devtools.emulator import EmulatorConfig, EmulatorServer
from worker.devtools.receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent
INJECT_DIR = Path(__file__).resolve().parent / "_inject"
TOKEN = "bench-runcomfy-token"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789").decode()
BUCKET = "bench-archive"
MIB = 1024 * 1024
#: Redis key the last hop of a bare chain increments (bench/baseline_app.py).
CHAIN_DONE_KEY = "bench:chain:done"
#: Redis set of upstream request ids the naive poller holds right now (bench/baseline_app.py).
NAIVE_ACTIVE_KEY = "bench:naive:active"

#: Environment for anything that may touch boto3: never a real profile or credentials.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": EmbeddedS3.ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": EmbeddedS3.SECRET_KEY,
    "AWS_DEFAULT_REGION": EmbeddedS3.REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class BenchError(RuntimeError):
    """A benchmark could not run (as opposed to a target that was missed)."""


# ---------------------------------------------------------------------------- result rows
@dataclass
class Row:
    """One line of the table: a figure, its same-run baseline, and the target it is held to."""

    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_unit: str = ""
    target: str = "report"
    #: True = PASS, False = MISS, None = reported only (no target, or no ratio target).
    passed: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: The figure crashed: this row stands in for the ones it would have produced.
    error: bool = False

    @property
    def ratio(self) -> float | None:
        """value / baseline, when both are there."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def verdict(self) -> str:
        """PASS, MISS, INFO (reported only) or ERROR (crashed)."""
        if self.error:
            return "ERROR"
        if self.passed is None:
            return "INFO"
        return "PASS" if self.passed else "MISS"

    def as_json(self) -> dict[str, Any]:
        """The row for the JSON file."""
        return {
            "figure": self.figure,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_unit": self.baseline_unit or self.unit,
            "ratio": self.ratio,
            "target": self.target,
            "verdict": self.verdict,
            "note": self.note,
            "details": self.details,
        }


def fmt(value: float | None, unit: str = "") -> str:
    """A number for the table: whole numbers as such, else 3 significant digits; unit after."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


# ---------------------------------------------------------------------------- waiting
def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> float:
    """Poll ``predicate`` until true; returns the seconds waited, BenchError after timeout."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_rss_bytes(pid: int) -> int:
    """VmRSS summed over a process and its descendants (prefork children included)."""
    return sum(rss_bytes(p) for p in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


# ---------------------------------------------------------------------------- processes
class S3Process:
    """moto's S3 server as a separate process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Process:
        """Start and wait until it accepts connections."""
        binary = Path(sys.executable).parent / "moto_server"
        argv = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
        self._proc = subprocess.Popen(
            [*argv, "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **AWS_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, timeout_s=30)
        return self

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=EmbeddedS3.ACCESS_KEY,
            aws_secret_access_key=EmbeddedS3.SECRET_KEY,
            region_name=EmbeddedS3.REGION,
        )

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket; waits for moto to answer HTTP (the port opens a little early)."""
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None
        return self._proc.pid

    def close(self) -> None:
        """Stop it."""
        if self._proc is not None:
            stop(self._proc)
            self._proc = None


def stop(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL if needed (only our own child)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker(WorkerProcess):
    """A worker subprocess: the service's (``python -m worker worker``) or a bench Celery app.

    ``start`` waits for Celery's "ready" line; ``close`` is a warm shutdown, then SIGKILL.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        pool: str = "threads",
        concurrency: int = 8,
        app_module: str | None = None,
        queues: str | None = None,
        name: str = "worker",
    ) -> None:
        log = tempfile.mktemp(prefix=f"bench-{name}-", suffix=".log")
        args = ["-P", pool, "-c", str(concurrency), "--without-mingle", "--without-gossip"]
        args += ["--without-heartbeat", "-n", f"{name}-{os.getpid()}@%h"]
        super().__init__(env, args=args, log_path=log)
        self.name = name
        if app_module is not None:
            self.argv = [sys.executable, "-m", "celery", "-A", app_module, "worker", *args]
            self.argv += ["-l", "INFO"]
            if queues:
                self.argv += ["-Q", queues]

    def rss(self) -> int:
        """RSS of the worker and its children."""
        return tree_rss_bytes(self.pid)

    def close(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown, then remove the log file; while an exception is propagating (a
        figure failed), print the log's tail first, for whoever reads the CI output."""
        super().close(timeout_s)
        if sys.exc_info()[0] is not None:
            print(f"--- last lines of the {self.name} worker's log:", file=sys.stderr)
            print(self.log_text()[-3000:], file=sys.stderr)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def start_all(workers: list[Worker]) -> None:
    """Start several workers at once (each start mostly waits for imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(workers)) as pool:
        for future in [pool.submit(w.start) for w in workers]:
            future.result()


def close_all(workers: list[Worker]) -> None:
    """Warm-shut several workers down at once (each takes about a second, mostly waiting)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(workers))) as pool:
        for future in [pool.submit(w.close) for w in workers]:
            future.result()


def bench_env(**extra: str) -> dict[str, str]:
    """A child environment: ours, the repo on PYTHONPATH, then ``extra``. The round-trip
    counter's ``sitecustomize`` goes on the path only when ``BENCH_REDIS_COUNT_FILE`` asks
    for it (it would shadow a distribution's own ``sitecustomize``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BENCH_"))}
    env.update(AWS_ENV)
    paths = [str(ROOT)]
    if extra.get("BENCH_REDIS_COUNT_FILE"):
        paths.insert(0, str(INJECT_DIR))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- the stack
class Stack:
    """Redis + S3 + emulator + webhook receiver, and worker environments that point at them."""

    def __init__(self, emulator: EmulatorConfig | None = None, *, s3: bool = True) -> None:
        self._want_s3 = s3
        self._emulator_config = emulator or EmulatorConfig(token=TOKEN, queue_s=0, run_s=0)
        self.redis_server = EmbeddedRedis()
        self.s3: S3Process | None = None
        self.emulator = EmulatorServer(self._emulator_config)
        self.receiver = WebhookReceiver(WEBHOOK_SECRET)
        self._exit = contextlib.ExitStack()
        self.redis: redis.Redis = None  # type: ignore[assignment]

    def __enter__(self) -> Stack:
        try:
            self._exit.enter_context(self.redis_server)
            self.redis = redis.Redis.from_url(self.redis_server.url)
            self._exit.callback(self.redis.close)
            if self._want_s3:
                self.s3 = S3Process().start()
                self._exit.callback(self.s3.close)
                self.s3.create_bucket(BUCKET)
            self._exit.enter_context(self.emulator)
            self._exit.enter_context(self.receiver)
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def cpu_seconds(self, worker: Worker | None = None) -> dict[str, float]:
        """CPU time used so far by each process of the stack (and ``worker``, if given)."""
        out = {
            "bench (producer, emulator, receiver)": cpu_seconds(os.getpid()),
            "redis": cpu_seconds(int(self.redis.info("server")["process_id"])),
        }
        if self.s3 is not None:
            out["s3 (moto)"] = tree_cpu_seconds(self.s3.pid)
        if worker is not None:
            out["worker"] = tree_cpu_seconds(worker.pid)
        return out

    def redis_url(self, db: int = 0) -> str:
        """URL of database ``db`` on the stack's Redis."""
        return f"redis://127.0.0.1:{self.redis_server.port}/{db}"

    def env(self, db: int = 0, **extra: str) -> dict[str, str]:
        """A worker environment for this stack (settings as the e2e tests use, then ``extra``)."""
        values = {
            "REDIS_URL": self.redis_url(db),
            "RUNCOMFY_BASE_URL": self.emulator.base_url,
            "RUNCOMFY_API_TOKEN": TOKEN,
            "S3_BUCKET": BUCKET,
            "S3_PREFIX": "bench/",
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "WEBHOOK_TIMEOUT_S": "5",
            "ALLOW_PRIVATE_NETWORKS": "true",
            "WORKER_LOG_JSON": "true",
            "WORKER_LOG_LEVEL": "INFO",
        }
        if self.s3 is not None:
            values["S3_ENDPOINT_URL"] = self.s3.endpoint_url
        values.update(extra)
        return bench_env(**values)

    def settings(self, db: int = 0, **extra: str) -> Any:
        """Service Settings as a worker with ``env(db, **extra)`` would load them."""
        from worker.settings import load_settings

        return load_settings(environ=self.env(db, **extra))

    def producer(self, db: int = 0, **extra: str) -> Any:
        """A Producer (and its Celery app) on this stack; close with ``app.close_runtime()``."""
        from worker.producer.producer import Producer
        from worker.queueing.run import create_app

        app = create_app(self.settings(db, **extra))
        return Producer(app.runtime, app)


def job_request(webhook_url: str | None = None, n: int = 0) -> dict[str, Any]:
    """A small, valid job request: one 1024x1024 image."""
    request: dict[str, Any] = {
        "input": {"prompt": f"bench image {n}", "size": "1024x1024", "force_single": True},
    }
    if webhook_url:
        request["webhook_url"] = webhook_url
    return request


def unacked(client: redis.Redis) -> int:
    """Messages a worker holds (delivered, not acked): kombu's ``unacked`` hash."""
    return int(client.hlen("unacked"))


def queue_lengths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each service queue."""
    from api_contracts.messages import ALL_QUEUES

    return {q: int(client.llen(q)) for q in ALL_QUEUES}
