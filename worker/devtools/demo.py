"""``runcomfy-worker demo`` (``make demo``): the whole pipeline on one machine, in under a minute.

It starts what the environment does not name, each piece on 127.0.0.1:

* Redis — a throw-away ``redis-server`` (unless ``REDIS_URL`` is set);
* S3 — moto's server with a fresh bucket (unless ``S3_ENDPOINT_URL`` or ``S3_BUCKET`` is set);
* RunComfy — the bundled emulator with short timings (unless ``RUNCOMFY_API_TOKEN`` or
  ``RUNCOMFY_BASE_URL`` is set);
* always a webhook receiver that verifies every delivery's signature, and one worker
  subprocess (``ALLOW_PRIVATE_NETWORKS=true``, since everything lives on loopback).

Then it submits a handful of jobs through :class:`worker.producer.client.Client`, shows
their progress (one line per job), checks every archived output (S3 bytes and SHA-256
against the record) and every webhook (verified with the ``standardwebhooks`` package),
copies the images into ``./demo-output/``, prints figures, and stops everything it
started — also on Ctrl-C or SIGTERM. The exit status is 0 only if every check passed.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TextIO

from api_contracts.jobs import JobRecord, JobStatus, WebhookState
from worker.errors import ServiceError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.devtools.embedded import WorkerProcess
    from worker.devtools.emulator import EmulatorServer
    from worker.devtools.receiver import WebhookReceiver
    from worker.producer.client import Client

DEMO_BUCKET: Final = "runcomfy-demo"
DEMO_PREFIX: Final = "demo/"
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: How long after a job ends its webhook may take to arrive.
WEBHOOK_GRACE_S: Final = 15.0
#: Refresh period of the progress block on a terminal.
REFRESH_S: Final = 0.2


@dataclass(frozen=True)
class DemoJob:
    """One job the demo submits."""

    name: str
    prompt: str
    size: str
    force_single: bool = True


DEMO_JOBS: Final = (
    DemoJob("lighthouse", "a lighthouse at dusk, oil on canvas", "2048x2048"),
    DemoJob("harbour", "a fishing harbour at dawn, wide angle", "2560x1440"),
    DemoJob("poster", "a minimalist poster of a red fox", "4096x4096"),
    DemoJob("panorama", "a mountain range at noon, ultra-wide panorama", "6198x2656"),
    DemoJob("cats", "a set of studies of a sleeping cat", "1024x1024", force_single=False),
)


@dataclass
class _Tracked:
    """A submitted job as the demo follows it."""

    spec: DemoJob
    record: JobRecord
    submitted_at: float
    error: str | None = None
    done: bool = False
    ended_at: float | None = None
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class _Services:
    """What the demo talks to, and which of it is embedded."""

    redis_url: str
    env: dict[str, str]
    s3: S3Client
    bucket: str
    client: Client
    receiver: WebhookReceiver
    worker: WorkerProcess
    emulator: EmulatorServer | None
    embedded: list[str]


class _Out:
    """Where the demo writes; knows whether it may redraw lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def say(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def raw(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# ====================================================================== entry point
def run_demo(
    *,
    output_dir: str | os.PathLike[str] = "demo-output",
    timeout_s: float = 120.0,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run the demo; returns the process exit status (0: every check passed)."""
    started = time.monotonic()
    out = _Out(stream or sys.stdout)
    env = dict(os.environ if environ is None else environ)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    stack = ExitStack()
    ok = False
    keep_log = False
    services: _Services | None = None
    try:
        with _interrupts_raise():
            try:
                services = _start(env, stack, out)
                ready = time.monotonic()
                out.say(f"everything up in {ready - started:.1f}s\n")
                ok = _run_jobs(
                    services,
                    output_dir=Path(output_dir),
                    timeout_s=timeout_s,
                    out=out,
                    started=started,
                    ready=ready,
                )
                keep_log = not ok
            except KeyboardInterrupt:
                out.say("\ninterrupted: stopping everything the demo started")
                return 130
            except _ConfigProblem as exc:
                out.say(f"error: {exc}")
                return 2
            except (_DemoError, ServiceError) as exc:
                out.say(f"error: {exc}")
                keep_log = True
                return 1
    finally:
        stopping = time.monotonic()
        _close_quietly(stack)
        out.say(f"stopped everything the demo started in {time.monotonic() - stopping:.1f}s")
        if services is not None and not keep_log:
            Path(services.worker.log_path).unlink(missing_ok=True)
    return 0 if ok else 1


class _DemoError(Exception):
    """The demo could not run; the message says why."""


class _ConfigProblem(_DemoError):
    """The environment's settings are invalid."""


@contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so cleanup runs for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_quietly(stack: ExitStack) -> None:
    """Stop everything; a second Ctrl-C must not leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        stack.close()
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ====================================================================== start-up
def _start(env: dict[str, str], stack: ExitStack, out: _Out) -> _Services:
    """Start the missing services and one worker; returns what the jobs need."""
    from worker.devtools.embedded import WorkerProcess
    from worker.devtools.receiver import WebhookReceiver
    from worker.errors import ConfigError
    from worker.producer.client import Client
    from worker.settings import load_settings

    embedded: list[str] = []
    worker_env = dict(env)
    worker_env.update(
        {
            "ALLOW_PRIVATE_NETWORKS": "true",  # the receiver (and emulator) are on loopback
            "WORKER_LOG_JSON": "false",
            "WORKER_METRICS_PORT": "0",
            "WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    worker_env.setdefault("WEBHOOK_RETRY_SCHEDULE", "0.5,1,2,4")

    redis_url = _start_redis(env, worker_env, stack, out, embedded)
    s3_client = _start_s3(env, worker_env, stack, out, embedded)

    # ---------------------------------------------------------------- RunComfy
    emulator = None
    if env.get("RUNCOMFY_API_TOKEN") or env.get("RUNCOMFY_BASE_URL"):
        base = env.get("RUNCOMFY_BASE_URL") or "https://model-api.runcomfy.net"
        out.say(f"runcomfy   {base} (RUNCOMFY_* settings)")
    else:
        emulator = _start_emulator(stack, worker_env)
        embedded.append("runcomfy")
        out.say(f"runcomfy   embedded emulator at {emulator.base_url} (queue 0.5s, run 2s)")

    # ---------------------------------------------------------------- webhooks, settings
    secret = _first_secret(env)
    if secret is None:
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        worker_env["WEBHOOK_SECRET"] = secret
    try:
        settings = load_settings(environ=worker_env)
    except ConfigError as exc:
        raise _ConfigProblem(str(exc)) from None
    receiver = WebhookReceiver(secret).start()
    stack.callback(receiver.close)
    out.say(f"webhooks   receiver verifying signatures at {receiver.url}")
    if s3_client is None:
        from worker.services.s3 import make_s3_client

        s3_client = make_s3_client(settings.s3)

    # ---------------------------------------------------------------- worker
    worker = WorkerProcess(
        worker_env, args=["-c", "8", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    )
    stack.callback(_stop_worker, worker)
    try:
        worker.start(ready_timeout_s=45)
    except (RuntimeError, TimeoutError) as exc:
        raise _DemoError(f"the worker did not start: {exc}") from None
    out.say(f"worker     pid {worker.pid}, threads pool, 8 slots")

    client = Client(settings=settings)
    stack.callback(client.close)
    return _Services(
        redis_url=redis_url,
        env=worker_env,
        s3=s3_client,
        bucket=settings.s3.bucket,
        client=client,
        receiver=receiver,
        worker=worker,
        emulator=emulator,
        embedded=embedded,
    )


def _start_redis(
    env: dict[str, str],
    worker_env: dict[str, str],
    stack: ExitStack,
    out: _Out,
    embedded: list[str],
) -> str:
    """REDIS_URL when set (checked now), else an embedded redis-server; its URL."""
    from worker.devtools.embedded import EmbeddedRedis

    redis_url = env.get("REDIS_URL", "")
    if redis_url:
        _check_redis(redis_url)
        out.say(f"redis      {_safe(redis_url)} (REDIS_URL)")
        return redis_url
    server = EmbeddedRedis().start()
    stack.callback(server.close)
    worker_env["REDIS_URL"] = server.url
    embedded.append("redis")
    out.say(f"redis      embedded redis-server at {server.url}")
    return server.url


def _start_s3(
    env: dict[str, str],
    worker_env: dict[str, str],
    stack: ExitStack,
    out: _Out,
    embedded: list[str],
) -> S3Client | None:
    """The operator's S3 when S3_* is set (None: a client is made from settings later), else
    an embedded moto server with a fresh bucket and a client for it."""
    from worker.devtools.embedded import EmbeddedS3

    if env.get("S3_ENDPOINT_URL") or env.get("S3_BUCKET"):
        bucket = env.get("S3_BUCKET") or "runcomfy-outputs"
        s3_endpoint = env.get("S3_ENDPOINT_URL") or "AWS"
        out.say(f"s3         bucket {bucket} at {s3_endpoint} (S3_* settings)")
        return None
    s3 = EmbeddedS3().start()
    stack.callback(s3.close)
    s3.create_bucket(DEMO_BUCKET)
    worker_env.update(s3.credentials_env())
    worker_env.update({"S3_BUCKET": DEMO_BUCKET, "S3_PREFIX": DEMO_PREFIX})
    embedded.append("s3")
    out.say(f"s3         embedded S3 (moto) at {s3.endpoint_url}, bucket {DEMO_BUCKET}")
    return _embedded_s3_client(s3)


def _check_redis(url: str) -> None:
    """Fail fast (not after the worker's start-up timeout) when REDIS_URL is unreachable."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise _DemoError(f"cannot reach Redis at {_safe(url)} (REDIS_URL): {exc}") from None
    finally:
        client.close()


def _start_emulator(stack: ExitStack, worker_env: dict[str, str]) -> EmulatorServer:
    from worker.devtools.emulator import EmulatorConfig, EmulatorServer

    token = "demo-" + secrets.token_hex(8)
    config = EmulatorConfig(token=token, queue_s=0.5, run_s=2.0, capacity=4, seed=0)
    emulator = EmulatorServer(config, host="127.0.0.1", port=0).start()
    stack.callback(emulator.close)
    worker_env.update({"RUNCOMFY_BASE_URL": emulator.base_url, "RUNCOMFY_API_TOKEN": token})
    # The emulator is quick: check often. Real RunComfy keeps the operator's POLL_* settings.
    worker_env.update(
        {"POLL_INITIAL_DELAY_S": "0.3", "POLL_MIN_INTERVAL_S": "0.3", "POLL_MAX_INTERVAL_S": "1"}
    )
    return emulator


def _embedded_s3_client(s3: Any) -> S3Client:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.ACCESS_KEY,
        aws_secret_access_key=s3.SECRET_KEY,
        region_name=s3.REGION,
    )


def _stop_worker(worker: WorkerProcess) -> None:
    worker.close(timeout_s=10)


def _first_secret(env: Mapping[str, str]) -> str | None:
    entries = [s.strip() for s in env.get("WEBHOOK_SECRET", "").split(",") if s.strip()]
    return entries[0] if entries else None


def _safe(url: str) -> str:
    from worker.producer.client import _safe_url

    return _safe_url(url)


# ====================================================================== the jobs
def _run_jobs(
    services: _Services,
    *,
    output_dir: Path,
    timeout_s: float,
    out: _Out,
    started: float,
    ready: float,
) -> bool:
    """Submit, follow, check and copy; print per-job results and figures. True if all ok."""
    client = services.client
    tracked: list[_Tracked] = []
    for spec in DEMO_JOBS:
        record = client.submit(
            prompt=spec.prompt,
            size=spec.size,
            force_single=spec.force_single,
            webhook_url=services.receiver.url,
            metadata={"demo": spec.name},
        )
        tracked.append(_Tracked(spec, record, time.monotonic()))
    out.say(f"submitted {len(tracked)} jobs (sizes {', '.join(t.spec.size for t in tracked)})\n")

    _follow_all(client, tracked, timeout_s, out)
    jobs_done = time.monotonic()

    output_dir.mkdir(parents=True, exist_ok=True)
    out.say("")
    total_bytes = 0
    files = 0
    for job in tracked:
        _check_job(job, services, output_dir)
        total_bytes += sum(o.bytes for o in job.record.outputs)
        files += len(job.record.outputs)
        for line in job.lines:
            out.say(line)
    failed = [j for j in tracked if j.problems]
    _figures(
        services,
        tracked,
        out,
        started=started,
        ready=ready,
        jobs_done=jobs_done,
        total_bytes=total_bytes,
        files=files,
        output_dir=output_dir,
    )
    if failed:
        out.say(f"\nFAILED: {len(failed)} of {len(tracked)} job(s) did not pass every check")
        out.say(f"worker log (kept): {services.worker.log_path}")
        return False
    out.say(f"\nall {len(tracked)} jobs passed: archived, checksums match, webhooks verified")
    out.say(f"open the images in {output_dir}/")
    return True


def _follow_all(client: Client, tracked: list[_Tracked], timeout_s: float, out: _Out) -> None:
    """Wait for every job (one thread each: the client is thread-safe), drawing progress."""
    lock = threading.Lock()
    changed = threading.Event()
    deadline = time.monotonic() + timeout_s

    def follow(job: _Tracked) -> None:
        def update(record: JobRecord) -> None:
            with lock:
                job.record = record
            changed.set()

        try:
            final = client.wait(
                job.record.id, timeout=max(0.1, deadline - time.monotonic()), on_update=update
            )
            with lock:
                job.record = final
        except Exception as exc:  # reported per job, never lost in a thread
            with lock:
                job.error = f"{type(exc).__name__}: {exc}"
        finally:
            with lock:
                job.done = True
                job.ended_at = time.monotonic()
            changed.set()

    threads = [
        threading.Thread(target=follow, args=(job,), name=f"demo-{job.spec.name}", daemon=True)
        for job in tracked
    ]
    for thread in threads:
        thread.start()
    out.say(f"  {'job':<11}{'size':<11}{'state':<12}{'upstream queue':<18}elapsed  id")
    board = _Board(out, len(tracked))
    while True:
        changed.wait(REFRESH_S if out.tty else 1.0)
        changed.clear()
        with lock:
            rows = [_progress_row(job) for job in tracked]
            all_done = all(job.done for job in tracked)
        board.draw(rows)
        if all_done:
            break
    board.close()


def _progress_row(job: _Tracked) -> tuple[str, str]:
    """(line to show, what counts as a change) for one job."""
    record = job.record
    state = record.status.value if job.error is None else "error"
    where = f"queue position {record.queue_position}" if record.queue_position is not None else ""
    end = job.ended_at if job.done and job.ended_at else time.monotonic()
    elapsed = end - job.submitted_at
    line = (
        f"  {job.spec.name:<11}{job.spec.size:<11}{state:<12}{where:<18}{elapsed:5.1f}s"
        f"  {record.id}"
    )
    return line.rstrip(), f"{state}|{where}"


class _Board:
    """One line per job: redrawn in place on a terminal, else printed when a job changes."""

    def __init__(self, out: _Out, rows: int) -> None:
        self.out = out
        self.rows = rows
        self.drawn = False
        self.last: dict[int, str] = {}

    def draw(self, rows: list[tuple[str, str]]) -> None:
        if self.out.tty:
            # A wrapped line would break the cursor arithmetic: cut to the terminal's width.
            width = max(20, shutil.get_terminal_size().columns - 1)
            if self.drawn:
                self.out.raw(f"\x1b[{self.rows}F")
            self.out.raw("".join(f"\x1b[2K{line[:width]}\n" for line, _ in rows))
            self.drawn = True
            return
        for i, (line, key) in enumerate(rows):
            if self.last.get(i) != key:
                self.last[i] = key
                self.out.say(line)

    def close(self) -> None:
        pass


def _check_job(job: _Tracked, services: _Services, output_dir: Path) -> None:
    """Verify one job end to end and fill ``job.lines`` with its report."""
    record = job.record
    duration = (
        (record.finished_at - record.created_at).total_seconds() if record.finished_at else None
    )
    took = f" in {duration:.1f}s" if duration is not None else ""
    outputs = f"{len(record.outputs)} image{'s' if len(record.outputs) != 1 else ''}"
    if job.error is not None:
        job.problems.append(job.error)
    elif record.status != JobStatus.SUCCEEDED:
        why = f": {record.error.code}: {record.error.message}" if record.error else ""
        job.problems.append(f"ended {record.status.value}{why}")
    head = f"{job.spec.name:<11}{record.status.value}{took}  ({job.spec.size}, {outputs})"
    lines = [f"{head}  job {record.id}"]
    for output in record.outputs:
        try:
            body = services.s3.get_object(Bucket=output.bucket, Key=output.key)["Body"].read()
        except Exception as exc:
            job.problems.append(f"cannot read {output.s3_uri}: {exc}")
            continue
        digest = hashlib.sha256(body).hexdigest()
        checks = []
        if len(body) != output.bytes or digest != output.sha256:
            job.problems.append(f"{output.s3_uri}: bytes or sha256 differ from the record")
            checks.append("CHECKSUM MISMATCH")
        else:
            checks.append("sha256 ok")
        if output.content_type == "image/png" and not body.startswith(PNG_SIGNATURE):
            job.problems.append(f"{output.s3_uri}: not a PNG")
        ext = output.key.rsplit(".", 1)[-1]
        local = output_dir / f"{job.spec.name}-{output.index}.{ext}"
        local.write_bytes(body)
        lines.append(f"    {output.s3_uri}")
        lines.append(
            f"      {output.bytes:,} bytes  sha256 {output.sha256}  {', '.join(checks)}  -> {local}"
        )
    lines.append("    " + _webhook_verdict(job, services))
    if job.problems:
        lines.extend(f"    PROBLEM: {p}" for p in job.problems)
    job.lines = lines


def _webhook_verdict(job: _Tracked, services: _Services) -> str:
    """Wait (briefly) for the job's webhook and say whether its signature verified."""
    job_id = job.record.id

    def arrived(deliveries: list[Any]) -> bool:
        return any(d.verified and d.job_id == job_id for d in deliveries)

    try:
        deliveries = services.receiver.wait_for(arrived, timeout=WEBHOOK_GRACE_S)
    except TimeoutError:
        job.problems.append("no verified webhook arrived")
        return "webhook NOT verified (none arrived)"
    got = [d for d in deliveries if d.job_id == job_id and d.verified]
    first = got[0]
    record = _settled(services.client, job_id)
    attempts = len(record.webhook.deliveries) if record and record.webhook else len(got)
    state = record.webhook.state if record and record.webhook else WebhookState.DELIVERED
    expected = f"job.{job.record.status.value}"
    if first.event_type != expected:
        job.problems.append(f"webhook type {first.event_type}, expected {expected}")
    return (
        f"webhook verified ({first.event_type}, webhook-id {first.webhook_id}, "
        f"{state.value} after {attempts} attempt{'s' if attempts != 1 else ''})"
    )


def _settled(client: Client, job_id: str, timeout_s: float = 5.0) -> JobRecord | None:
    """The record once the worker has written down the delivery (it lands just after)."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout_s
    record = None
    while time.monotonic() < deadline:
        try:
            record = client.get(job_id)
        except Exception:
            return None
        if record.webhook is None or record.webhook.state != WebhookState.PENDING:
            break
        pause.wait(0.05)
    return record


def _figures(
    services: _Services,
    tracked: list[_Tracked],
    out: _Out,
    *,
    started: float,
    ready: float,
    jobs_done: float,
    total_bytes: int,
    files: int,
    output_dir: Path,
) -> None:
    """The numbers at the end: wall time, start-up, per-job latency, bytes, upstream calls."""
    latencies = sorted(
        (j.record.finished_at - j.record.created_at).total_seconds()
        for j in tracked
        if j.record.finished_at is not None
    )
    now = time.monotonic()
    out.say("")
    out.say("figures")
    out.say(
        f"  wall time        {now - started:.1f}s (start-up {ready - started:.1f}s, "
        f"jobs {jobs_done - ready:.1f}s, checks and copies {now - jobs_done:.1f}s)"
    )
    if latencies:
        median = latencies[len(latencies) // 2]
        out.say(
            f"  job latency      min {latencies[0]:.1f}s  median {median:.1f}s  "
            f"max {latencies[-1]:.1f}s (created -> final)"
        )
    out.say(f"  archived         {files} file(s), {total_bytes:,} bytes in s3://{services.bucket}/")
    out.say(f"  copied to        {output_dir}/")
    verified = sum(
        1 for d in services.receiver.deliveries() if d.verified
    )  # every delivery, retries included
    out.say(f"  webhooks         {verified} verified deliveries for {len(tracked)} jobs")
    if services.emulator is not None:
        counters = services.emulator.counters()
        out.say(
            f"  upstream calls   {counters['submits']} submits, {counters['status_calls']} status, "
            f"{counters['result_calls']} result, {counters['downloads']} downloads (emulator)"
        )
    out.say(f"  embedded         {', '.join(services.embedded) or 'nothing'} (+ receiver, worker)")


__all__ = ["DEMO_JOBS", "DemoJob", "run_demo"]
