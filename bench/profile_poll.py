"""``python -m bench.profile_poll [--checks N] [--job]``: where the CPU of one status check
(or, with ``--job``, of one whole job) goes.

Starts the stack bench/common.py uses (Redis, moto S3, the RunComfy emulator), then one
service worker (``python -m worker worker``) with ``-P solo``, so every task runs on the main
thread. Its jobs' generations run for an hour and poll every 0.05 s (``POLL_INITIAL_DELAY_S``
/ ``POLL_MIN_INTERVAL_S`` / ``POLL_MAX_INTERVAL_S``), so once the submits are in, all the
worker does is status checks, back to back. Checks are counted by the emulator.

Three windows on the same worker, switched by signals (start-up is never measured):

1. unprofiled: checks/s and the true CPU per check (``/proc``, whole process and main thread);
2. sampled: the main thread's Python stack every tick of process CPU time (``ITIMER_PROF``),
   a statistical split with no per-call distortion (C functions count for their caller);
3. cProfile (the main thread's CPU clock, ``--wall`` for wall-clock time) over ``--checks``
   checks: tottime by package and the top functions. cProfile's own cost per function call
   inflates the total several times and leans the shares towards code that makes many
   small calls; the sampled column is the one to trust for shares, cProfile for call counts
   and for naming functions.

By package, ``own`` counts the functions in the package's files; ``charged`` also counts the
standard-library and C functions they call (charged to the nearest package caller).

``--job``: the same three windows over whole jobs instead of status checks. The emulator
answers at once (zero latency, ``run_s`` 0, one 1024x1024 PNG per job, as ``python -m bench
--only throughput``); a feeder thread here keeps ``--jobs`` jobs in flight, each with a
webhook to the stack's receiver, so every job is submit → poll → archive → notify, and the
unit counted is a webhook received. The report adds the split by step (the sampled stacks
that pass through ``worker/jobs/steps/<step>.py``, and what is left: Celery and kombu taking
messages in, acking them, and the task wrapper), and each step's split by package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import ROOT, BenchError, Stack, Worker, cpu_seconds, job_request, wait_until

#: Window switches (Celery keeps SIGUSR1 and SIGUSR2 for itself).
SIG_PROFILE_ON = int(signal.SIGRTMIN) + 1
SIG_PROFILE_OFF = int(signal.SIGRTMIN) + 2
SIG_SAMPLE_ON = int(signal.SIGRTMIN) + 3
SIG_SAMPLE_OFF = int(signal.SIGRTMIN) + 4
#: Asked-for sampling interval (s of process CPU); the kernel's tick may make it coarser.
SAMPLE_INTERVAL_S = 0.001

POLL_ENV = {
    "POLL_INITIAL_DELAY_S": "0",
    "POLL_MIN_INTERVAL_S": "0.05",
    "POLL_MAX_INTERVAL_S": "0.05",
}
LONG_RUN_S = 3600.0
#: ``--job``: as ``python -m bench --only throughput`` (bench/throughput.py's FAST).
JOB_ENV = {
    "POLL_INITIAL_DELAY_S": "0",
    "POLL_MIN_INTERVAL_S": "0.05",
    "POLL_MAX_INTERVAL_S": "0.05",
    "WEBHOOK_RETRY_SCHEDULE": "0.5,1,1",
}

#: Table order; ``other`` takes the rest.
GROUPS = (
    "celery",
    "kombu",
    "redis",
    "httpx",
    "boto",
    "pydantic",
    "logging",
    "json",
    "worker",
    "other",
)
NEUTRAL = "stdlib / C"
GROUP_LABELS = {
    "celery": "celery (+ billiard, vine)",
    "kombu": "kombu",
    "redis": "redis-py",
    "httpx": "httpx / httpcore / h11",
    "boto": "boto3 / botocore / s3transfer / urllib3",
    "pydantic": "pydantic",
    "logging": "logging (stdlib + worker/logs.py)",
    "json": "json",
    "worker": "worker (ours: worker/, api_contracts/)",
    "other": "other",
    NEUTRAL: "stdlib / C (own; charged above)",
}
_TOP_LEVEL = {
    "celery": "celery",
    "billiard": "celery",
    "vine": "celery",
    "kombu": "kombu",
    "amqp": "kombu",
    "redis": "redis",
    "httpx": "httpx",
    "httpcore": "httpx",
    "h11": "httpx",
    "boto3": "boto",
    "botocore": "boto",
    "s3transfer": "boto",
    "urllib3": "boto",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "pydantic_settings": "pydantic",
    "logging": "logging",
    "json": "json",
    "orjson": "json",
    "worker": "worker",
    "api_contracts": "worker",
}
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()

Key = tuple[str, int, str]
"""A function in pstats: (file, line, name); file ``~`` for C functions."""


# ---------------------------------------------------------------------------- classifying
@lru_cache(maxsize=4096)
def module_of(filename: str) -> str:
    """Where a function lives: ``site:<top package>``, ``ours:<path in the repo>``,
    ``stdlib:<module>``, ``builtin`` (C) or ``other:<file>``."""
    if filename == "~":
        return "builtin"
    if filename.startswith("<frozen "):  # os, abc, codecs … are frozen in 3.11
        return "stdlib:" + filename.removeprefix("<frozen ").rstrip(">").split(".")[0]
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1 :]
        return "site:" + (rest[0].removesuffix(".py") if rest else "?")
    with contextlib.suppress(ValueError):
        return "ours:" + path.resolve().relative_to(ROOT).as_posix()
    with contextlib.suppress(ValueError):
        rel = path.resolve().relative_to(_STDLIB)
        return "stdlib:" + (rel.parts[0].removesuffix(".py") if rel.parts else "?")
    return f"other:{filename}"


@lru_cache(maxsize=4096)
def group_of(filename: str) -> str | None:
    """The table group of a file; None for the standard library (bar logging and json) and
    C functions, which are charged to whoever called them."""
    kind, _, name = module_of(filename).partition(":")
    if kind == "ours":
        if name == "worker/logs.py":
            return "logging"
        return _TOP_LEVEL.get(name.split("/")[0], "other")
    if kind in ("site", "stdlib"):
        group = _TOP_LEVEL.get(name)
        if group is not None:
            return group
        return None if kind == "stdlib" else "other"
    return None if kind == "builtin" else "other"


def label(key: Key) -> str:
    """``celery/app/trace.py:412(trace_task)`` or the C function's name."""
    filename, line, name = key
    if filename == "~":
        return name
    kind, _, rest = module_of(filename).partition(":")
    if kind == "site":
        parts = Path(filename).parts
        short = "/".join(parts[parts.index("site-packages") + 1 :])
    elif kind == "ours":
        short = rest
    elif kind == "stdlib" and not filename.startswith("<"):
        short = Path(filename).resolve().relative_to(_STDLIB).as_posix()
    else:
        short = filename
    return f"{short}:{line}({name})"


# ---------------------------------------------------------------------------- cProfile split
class Split:
    """Own and charged time by group from a cProfile stats table (``pstats.Stats.stats``)."""

    def __init__(self, stats: dict[Key, Any]) -> None:
        self.stats = stats
        self._owners: dict[Key, dict[str, float]] = {}
        self._active: set[Key] = set()

    def owners(self, key: Key) -> dict[str, float]:
        """Fractions of ``key``'s cost charged to each group: its own group, or (stdlib and
        C functions) its callers' owners, weighted by the time spent on each call edge."""
        group = group_of(key[0])
        if group is not None:
            return {group: 1.0}
        if key in self._owners:
            return self._owners[key]
        if key in self._active:  # a cycle of stdlib/C functions: no owner from this path
            return {}
        self._active.add(key)
        callers: dict[Key, tuple[Any, ...]] = self.stats.get(key, (0, 0, 0.0, 0.0, {}))[4]
        edges = [(self.owners(caller), edge) for caller, edge in callers.items()]
        edges = [(owners, edge) for owners, edge in edges if owners]
        self._active.discard(key)
        weights = [max(float(edge[2]), 0.0) for _, edge in edges]
        if sum(weights) <= 0:  # no time measured on any edge: share by number of calls
            weights = [float(edge[1]) for _, edge in edges]
        total = sum(weights)
        out: dict[str, float] = defaultdict(float)
        for (owners, _), weight in zip(edges, weights, strict=True):
            for name, share in owners.items():
                out[name] += share * weight / total
        result = dict(out) if total > 0 else {"other": 1.0}
        self._owners[key] = result
        return result

    def by_group(self) -> dict[str, dict[str, float]]:
        """Per group: ``own`` and ``charged`` seconds, ``calls`` (charged)."""
        table = {g: {"own": 0.0, "charged": 0.0, "calls": 0.0} for g in [*GROUPS, NEUTRAL]}
        for key, (_cc, nc, tt, _ct, _callers) in self.stats.items():
            table[group_of(key[0]) or NEUTRAL]["own"] += tt
            for owner, share in self.owners(key).items():
                table[owner]["charged"] += tt * share
                table[owner]["calls"] += nc * share
        return table

    def total(self) -> float:
        """Seconds of all functions (sum of tottime)."""
        return float(sum(row[2] for row in self.stats.values()))

    def calls(self) -> int:
        """Function calls recorded."""
        return int(sum(row[1] for row in self.stats.values()))

    def top(self, n: int) -> list[tuple[Key, float, int, str]]:
        """The ``n`` functions with the most tottime: (key, seconds, calls, charged group)."""
        ranked = sorted(self.stats.items(), key=lambda kv: -kv[1][2])[:n]
        out = []
        for key, (_cc, nc, tt, _ct, _callers) in ranked:
            owners = self.owners(key)
            main = max(owners, key=lambda g: owners[g]) if owners else "other"
            out.append((key, float(tt), int(nc), main))
        return out


# ---------------------------------------------------------------------------- sampling
class Sampler:
    """On every SIGPROF (a tick of process CPU time), the interrupted Python stack of the main
    thread: the leaf function, its group, and the group it is charged to (the nearest frame
    that belongs to a group, so stdlib and C time counts for its package caller)."""

    def __init__(self) -> None:
        self.leaf: Counter[Key] = Counter()
        self.stacks: Counter[tuple[Key, ...]] = Counter()
        self.own: Counter[str] = Counter()
        self.charged: Counter[str] = Counter()
        self.samples = 0

    def __call__(self, _signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        self.samples += 1
        code = frame.f_code
        self.leaf[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        own = group_of(code.co_filename)
        self.own[own or NEUTRAL] += 1
        charged: str | None = None
        stack: list[Key] = []
        current: FrameType | None = frame
        while current is not None:
            code = current.f_code
            charged = charged or group_of(code.co_filename)
            stack.append((code.co_filename, code.co_firstlineno, code.co_name))
            current = current.f_back
        self.charged[charged or "other"] += 1
        self.stacks[tuple(reversed(stack))] += 1

    def start(self) -> None:
        """Sample from now on."""
        signal.signal(signal.SIGPROF, self)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL_S, SAMPLE_INTERVAL_S)

    def stop(self) -> dict[str, Any]:
        """Stop; the counts as JSON-able data."""
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        return {
            "samples": self.samples,
            "own": dict(self.own),
            "charged": dict(self.charged),
            "leaf": [[list(key), n] for key, n in self.leaf.most_common(50)],
            "stacks": [[[list(key) for key in stack], n] for stack, n in self.stacks.items()],
        }


# ---------------------------------------------------------------------------- the worker side
def _write(path: str, write: Any) -> None:
    partial = path + ".partial"
    write(partial)
    os.replace(partial, path)  # the parent waits for the whole file


def child(out: str, wall: bool, worker_args: list[str]) -> int:
    """In the worker process: ``runcomfy-worker worker`` with the window switches."""
    import cProfile

    from worker.queueing.run import run_worker

    profiler = cProfile.Profile(time.perf_counter if wall else time.thread_time)
    sampler = Sampler()

    def profile_on(_signum: int, _frame: Any) -> None:
        profiler.enable()

    def profile_off(_signum: int, _frame: Any) -> None:
        profiler.disable()
        _write(out + ".prof", profiler.dump_stats)

    def sample_on(_signum: int, _frame: Any) -> None:
        sampler.start()

    def sample_off(_signum: int, _frame: Any) -> None:
        data = json.dumps(sampler.stop())
        _write(out + ".samples", lambda path: Path(path).write_text(data))

    signal.signal(SIG_PROFILE_ON, profile_on)
    signal.signal(SIG_PROFILE_OFF, profile_off)
    signal.signal(SIG_SAMPLE_ON, sample_on)
    signal.signal(SIG_SAMPLE_OFF, sample_off)
    return run_worker(worker_args)


# ---------------------------------------------------------------------------- the bench side
def _thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Window:
    """Units of work (status checks the emulator answered, or with ``--job`` webhooks the
    receiver got), seconds and the worker's CPU between ``__enter__`` and ``__exit__``."""

    #: what one unit is, for the printed text
    unit = "check"

    def __init__(self, stack: Stack, pid: int, *, jobs: bool = False) -> None:
        self.stack, self.pid = stack, pid
        self.checks, self.seconds, self.cpu_s, self.main_cpu_s = 0, 0.0, 0.0, 0.0
        self._jobs = jobs
        if jobs:
            self.unit = "job"

    def calls(self) -> int:
        """Units done so far: status calls the emulator has answered, or webhooks received."""
        if self._jobs:
            return len(self.stack.receiver.deliveries())
        return int(self.stack.emulator.counters()["status_calls"])

    def __enter__(self) -> Window:
        self._calls, self._t = self.calls(), time.monotonic()
        self._cpu, self._main = cpu_seconds(self.pid), _thread_cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.checks = self.calls() - self._calls
        self.seconds = time.monotonic() - self._t
        self.cpu_s = cpu_seconds(self.pid) - self._cpu
        self.main_cpu_s = _thread_cpu_seconds(self.pid) - self._main

    def text(self) -> str:
        """``743 checks in 3.0 s = 248/s; CPU per check 3,499 µs (3,499 main thread)``"""
        n = max(self.checks, 1)
        return (
            f"{self.checks:,} {self.unit}s in {self.seconds:.1f} s = "
            f"{self.checks / self.seconds:.0f}/s; "
            f"CPU per {self.unit} {self.cpu_s * 1e6 / n:,.0f} µs "
            f"({self.main_cpu_s * 1e6 / n:,.0f} main thread)"
        )


class Feeder:
    """``--job``: keeps ``in_flight`` jobs (each with a webhook to the stack's receiver) between
    enqueued and delivered, from a thread of this process, until stopped."""

    def __init__(self, stack: Stack, producer: Any, in_flight: int) -> None:
        self.stack, self.producer, self.in_flight = stack, producer, in_flight
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def _run(self) -> None:
        url = self.stack.receiver.url
        try:
            while not self._stop.is_set():
                if self.sent - len(self.stack.receiver.deliveries()) < self.in_flight:
                    self.producer.enqueue(job_request(url, self.sent))
                    self.sent += 1
                else:
                    time.sleep(0.002)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise BenchError(f"the feeder failed: {self.error!r}")


def measure(
    checks: int,
    jobs: int,
    baseline_s: float,
    sample_s: float,
    wall: bool,
    *,
    whole_jobs: bool = False,
) -> dict[str, Any]:
    """Start the stack and the worker, run the three windows; the raw results. ``checks``
    is the cProfile window's length in units (whole jobs with ``whole_jobs``)."""
    out = tempfile.mktemp(prefix="bench-profile-poll-")
    try:
        return _measure(out, checks, jobs, baseline_s, sample_s, wall, whole_jobs)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out + ".prof")
        raise


def _measure(
    out: str,
    checks: int,
    jobs: int,
    baseline_s: float,
    sample_s: float,
    wall: bool,
    whole_jobs: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "jobs": jobs,
        "timer": "wall clock" if wall else "thread CPU",
        "whole_jobs": whole_jobs,
    }
    # About one sample per ms of CPU: 1,000 checks, or 300 jobs of ~5-20 ms each.
    want_samples = 300 if whole_jobs else 1000
    with Stack() as stack:
        if whole_jobs:
            stack.emulator.update_config(queue_s=0, run_s=0, capacity=100_000, output_min_bytes=0)
            worker_env = JOB_ENV
        else:
            stack.emulator.update_config(run_s=LONG_RUN_S, capacity=100_000)
            worker_env = POLL_ENV
        env = stack.env(0, **worker_env)
        worker = Worker(env, pool="solo", concurrency=1, name="profile-poll")
        # python -m worker worker ARGS  →  python -m bench.profile_poll --child OUT -- ARGS
        if worker.argv[1:4] != ["-m", "worker", "worker"]:
            raise BenchError(f"unexpected worker command line: {worker.argv}")
        args = worker.argv[4:]
        worker.argv = [sys.executable, "-m", "bench.profile_poll", "--child", out]
        worker.argv += [*(["--wall"] if wall else []), "--", *args]
        producer = stack.producer(0, **worker_env)
        feeding = contextlib.ExitStack()
        try:
            worker.start()
            pid = worker.pid
            counters = stack.emulator.counters
            if whole_jobs:
                feeding.enter_context(Feeder(stack, producer, jobs))
                # warm: every client built, every code path run a few times
                deliveries = stack.receiver.deliveries
                wait_until(lambda: len(deliveries()) >= 2 * jobs, 60, "warm-up jobs")
            else:
                for i in range(jobs):
                    producer.enqueue(job_request(n=i))
                wait_until(lambda: int(counters()["submits"]) >= jobs, 30, "submits")
                wait_until(lambda: int(counters()["status_calls"]) >= 2 * jobs, 30, "first checks")
                time.sleep(0.5)  # steady state: every job polling

            with Window(stack, pid, jobs=whole_jobs) as clean:
                time.sleep(baseline_s)
            if clean.checks <= 0:
                raise BenchError(f"no {clean.unit}s in the unprofiled window")
            result["unprofiled"] = clean

            with Window(stack, pid, jobs=whole_jobs) as sampled:
                os.kill(pid, SIG_SAMPLE_ON)
                start = sampled.calls()
                time.sleep(sample_s)
                with contextlib.suppress(BenchError):  # about one sample per ms of CPU
                    wait_until(lambda: sampled.calls() - start >= want_samples, 15, "units", 0.05)
                os.kill(pid, SIG_SAMPLE_OFF)
            wait_until(lambda: os.path.exists(out + ".samples"), 30, "the samples")
            result["sampled"] = sampled
            result["samples"] = json.loads(Path(out + ".samples").read_text())

            with Window(stack, pid, jobs=whole_jobs) as profiled:
                os.kill(pid, SIG_PROFILE_ON)
                with contextlib.suppress(BenchError):  # too slow: report what there is
                    start = profiled.calls()
                    wait_until(lambda: profiled.calls() - start >= checks, 25, "units", 0.02)
                os.kill(pid, SIG_PROFILE_OFF)
            wait_until(lambda: os.path.exists(out + ".prof"), 30, "the profile")
            feeding.close()
            result["profiled"] = profiled
            result["stats"] = pstats.Stats(out + ".prof").stats  # type: ignore[attr-defined]
            result["prof_path"] = out + ".prof"
            worker.kill()  # hundreds of due polls: nothing worth a warm shutdown
        finally:
            feeding.close()
            worker.close()
            producer.app.close_runtime()
            with contextlib.suppress(OSError):
                os.unlink(out + ".samples")
    return result


def report(result: dict[str, Any], top_n: int = 15) -> str:
    """The printed tables."""
    clean: Window = result["unprofiled"]
    profiled: Window = result["profiled"]
    samples: dict[str, Any] = result["samples"]
    split = Split(result["stats"])
    checks = max(profiled.checks, 1)
    true_us = clean.cpu_s * 1e6 / max(clean.checks, 1)
    total = split.total() or 1e-12
    n_samples = max(int(samples["samples"]), 1)
    unit = clean.unit
    if result.get("whole_jobs"):
        what = (
            f"{result['jobs']} jobs in flight, zero-latency emulator, each submit → poll → "
            "archive → notify"
        )
    else:
        what = f"{result['jobs']} hour-long jobs polling every 0.05 s"
    lines = [
        f"one service worker, -P solo, {what}",
        f"  unprofiled: {clean.text()}",
        f"  sampled:    {result['sampled'].text()}; {n_samples:,} stack samples",
        f"  cProfile:   {profiled.text()}",
        f"  cProfile ({result['timer']}, main thread): {total * 1e6 / checks:,.0f} µs per {unit} "
        f"as measured (the profiler inflates it {total * 1e6 / checks / true_us:.1f}x), "
        f"{split.calls() / checks:,.0f} Python and C function calls per {unit}",
        "",
        f"CPU by package: sampled (no distortion; µs/{unit} = share x the unprofiled CPU per "
        f"{unit}) and cProfile tottime",
    ]
    per = f"µs/{unit}"
    calls_per = f"calls/{unit}"
    header = (
        f"  {'package':<40} {'sampled':>8} {per:>9} {'cProf own':>10} "
        f"{'cProf charged':>14} {calls_per:>12}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    table = split.by_group()
    for group in [*GROUPS, NEUTRAL]:
        row = table[group]
        if group == NEUTRAL:
            share = samples["own"].get(NEUTRAL, 0) / n_samples
            cells = (f"{share:7.1%}*", "", f"{row['own'] / total:10.1%}", "", "")
        else:
            share = samples["charged"].get(group, 0) / n_samples
            cells = (
                f"{share:8.1%}",
                f"{share * true_us:9,.0f}",
                f"{row['own'] / total:10.1%}",
                f"{row['charged'] / total:14.1%}",
                f"{row['calls'] / checks:12,.0f}",
            )
        lines.append(
            f"  {GROUP_LABELS[group]:<40} "
            + " ".join(f"{c:>{w}}" for c, w in zip(cells, (8, 9, 10, 14, 12), strict=True))
        )
    lines.append(
        "  * sampled in stdlib Python code (C code counts for its Python caller); charged above"
    )

    lines += ["", f"top {top_n} functions by cProfile tottime (own time):"]
    lines.append(f"  {'share':>6} {per:>9} {calls_per:>12}  {'charged to':<9} function")
    for key, seconds, n_calls, owner in split.top(top_n):
        lines.append(
            f"  {seconds / total:6.1%} {seconds * 1e6 / checks:9,.1f} {n_calls / checks:12,.1f}"
            f"  {owner:<9} {label(key)}"
        )
    lines += ["", f"top {top_n // 2} functions by samples (Python frames; C time in its caller):"]
    for raw_key, n in samples["leaf"][: top_n // 2]:
        lines.append(
            f"  {n / n_samples:6.1%} {n / n_samples * true_us:9,.0f} {per}  {_key(raw_key)}"
        )
    if samples.get("stacks") and result.get("whole_jobs"):
        lines += ["", *step_table(samples["stacks"], n_samples, true_us)]
    if samples.get("stacks"):
        lines += ["", "where it is spent (sampled call tree; chains of one call collapsed, ≥ 2 %):"]
        lines += call_tree(samples["stacks"], n_samples, true_us)
        lines += ["", f"a few things every {unit} does (sampled, inclusive, all call sites):"]
        for share, text in notable(samples["stacks"], n_samples):
            lines.append(f"  {share:6.1%} {share * true_us:7,.0f} µs  {text}")
    return "\n".join(lines)


#: Where a sampled stack is, by step: the first frame in one of these files decides.
STEP_FILES = (
    ("worker/jobs/steps/submit.py", "submit"),
    ("worker/jobs/steps/poll.py", "poll"),
    ("worker/jobs/steps/archive.py", "archive"),
    ("worker/jobs/steps/notify.py", "notify"),
    ("worker/queueing/tasks.py", "task wrapper (parse, context)"),
)
#: Samples in no step: Celery's and kombu's own work (take messages in, ack, the loop).
OUTSIDE_STEPS = "outside tasks (consumer, ack, loop)"


def step_of(frames: list[Any]) -> str:
    """The step a sampled stack (outermost frame first) belongs to."""
    found: str | None = None
    for raw in frames:
        filename = str(raw[0])
        for ending, step in STEP_FILES:
            if filename.endswith(ending):
                if step in ("submit", "poll", "archive", "notify"):
                    return step
                found = found or step
    return found or OUTSIDE_STEPS


def charged_group(frames: list[Any]) -> str:
    """The group a sampled stack's time is charged to: its innermost frame with a group."""
    for raw in reversed(frames):
        group = group_of(str(raw[0]))
        if group is not None:
            return group
    return "other"


def step_table(stacks: list[list[Any]], n_samples: int, us_per_job: float) -> list[str]:
    """Sampled CPU by step, and each step's split by package (≥ 1 % of the step)."""
    by_step: dict[str, Counter[str]] = defaultdict(Counter)
    for frames, count in stacks:
        by_step[step_of(frames)][charged_group(frames)] += count
    lines = ["CPU by step (sampled; a step's packages, largest first, ≥ 1 % of the step):"]
    order = [step for _, step in STEP_FILES] + [OUTSIDE_STEPS]
    for step in sorted(by_step, key=order.index):
        groups = by_step[step]
        n = sum(groups.values())
        share = n / n_samples
        parts = ", ".join(
            f"{group} {c / n:.0%}" for group, c in groups.most_common() if c / n >= 0.01
        )
        lines.append(f"  {share:6.1%} {share * us_per_job:7,.0f} µs  {step:<38} {parts}")
    return lines


#: (file ending, function) → what it is; a function that is not there is left out.
NOTABLE = (
    ("celery/worker/strategy.py", "task_message_handler", "celery: take a message in"),
    ("kombu/transport/redis.py", "append", "kombu: unacked bookkeeping on delivery"),
    ("kombu/transport/virtual/base.py", "basic_ack", "kombu: ack (acks_late)"),
    ("celery/app/base.py", "send_task", "celery: publish a task"),
    ("worker/services/runcomfy.py", "status", "ours: the upstream status call"),
    ("kombu/transport/redis.py", "_create_client", "kombu: a new redis.Redis per command"),
    ("logging/__init__.py", "_log", "logging: every log record"),
    ("json/__init__.py", "dumps", "json: encode"),
    ("json/__init__.py", "loads", "json: decode"),
)


def notable(stacks: list[list[Any]], n_samples: int) -> list[tuple[float, str]]:
    """Inclusive share of the samples of each :data:`NOTABLE` function found."""
    counts: Counter[int] = Counter()
    for frames, count in stacks:
        hits = {
            i
            for raw in frames
            for i, (ending, name, _) in enumerate(NOTABLE)
            if raw[2] == name and str(raw[0]).endswith(ending)
        }
        counts.update(dict.fromkeys(hits, count))
    return [(counts[i] / n_samples, NOTABLE[i][2]) for i in range(len(NOTABLE)) if counts[i]]


class _Node:
    def __init__(self, key: Key | None) -> None:
        self.key, self.count, self.children = key, 0, dict[Key, "_Node"]()


def call_tree(
    stacks: list[list[Any]], n_samples: int, us_per_check: float, min_share: float = 0.02
) -> list[str]:
    """The sampled stacks as an indented tree of share, µs per check and function. A chain of
    nodes each with one child that matters (≥ 90 % of its samples, no sibling shown) is one
    line, ``first … last``."""
    root = _Node(None)
    for frames, count in stacks:
        node = root
        node.count += count
        for raw in frames:
            key = (str(raw[0]), int(raw[1]), str(raw[2]))
            node = node.children.setdefault(key, _Node(key))
            node.count += count

    def collapse(node: _Node) -> tuple[_Node, _Node]:
        first = node
        while node.children:
            ranked = sorted(node.children.values(), key=lambda c: -c.count)
            if ranked[0].count < 0.9 * node.count:
                break
            if len(ranked) > 1 and ranked[1].count >= min_share * n_samples:
                break  # a sibling big enough to show
            node = ranked[0]
        return first, node

    lines: list[str] = []

    def walk(node: _Node, depth: int) -> None:
        for child in sorted(node.children.values(), key=lambda c: -c.count):
            share = child.count / n_samples
            if share < min_share or len(lines) >= 40:
                continue
            first, last = collapse(child)
            assert last.key is not None and first.key is not None
            name = label(last.key)
            if first is not last:
                name = f"{label(first.key)} … {name}"
            lines.append(f"  {share:6.1%} {share * us_per_check:7,.0f} µs  {'  ' * depth}{name}")
            walk(last, depth + 1)

    _, top = collapse(root)  # the worker's main loop, down to where the work forks
    walk(top, 0)
    return lines


def _key(raw: list[Any]) -> str:
    return label((str(raw[0]), int(raw[1]), str(raw[2])))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.profile_poll``; ``--child`` is the worker side."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_poll", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checks", type=int, default=None, help="status checks (jobs) under cProfile"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="hour-long jobs polling at once (--job: in flight)"
    )
    parser.add_argument(
        "--job", action="store_true", help="whole jobs (submit, poll, archive, notify)"
    )
    parser.add_argument("--baseline-s", type=float, default=3.0, help="unprofiled window, s")
    parser.add_argument(
        "--sample-s", type=float, default=4.0, help="sampled window, s (longer for < 1,000 checks)"
    )
    parser.add_argument("--wall", action="store_true", help="cProfile on wall-clock time")
    parser.add_argument("--save", metavar="PATH", help="keep the cProfile stats (pstats) there")
    parser.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("worker_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.wall, args.worker_args)
    started = time.monotonic()
    checks = args.checks or (100 if args.job else 400)
    jobs = args.jobs or (8 if args.job else 32)
    result = measure(checks, jobs, args.baseline_s, args.sample_s, args.wall, whole_jobs=args.job)
    try:
        print(report(result))
    finally:
        if args.save:
            os.replace(result["prof_path"], args.save)
            print(f"\ncProfile stats kept in {args.save} (python -m pstats {args.save})")
        else:
            with contextlib.suppress(OSError):
                os.unlink(result["prof_path"])
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
