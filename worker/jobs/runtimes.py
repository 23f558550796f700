"""How long generations take: a small learned sketch per (model, size, force_single).

The status schedule (:func:`worker.jobs.decisions.next_check`) checks less when it knows
when a generation will finish. Each kind has two sketches (:class:`Learned`), fed by every
job that upstream completes (:func:`worker.jobs.decisions.learned_samples`):

* **total**: from the submit to done, queue wait included: what the first check, and every
  check of a job never seen ``in_queue``, plans with. Every finished job adds one sample.
* **run**: from the start to done: what the checks of a job seen ``in_queue`` plan with (it
  has not started; its run is still ahead). Only jobs whose start is known add one: seen
  queued and then running, or running at a check soon after the submit.

Keeping them apart keeps each one true to what it plans: a run-time sample that includes a
queue wait nobody saw would move the first check of every job (and more of them would be
late), and a total that excludes it would put it earlier (more checks).

Each sketch is:

* **buckets**: fixed, log-spaced (each 5 % wider than the one before, from 0.1 s), so a
  sample is one ``HINCRBY`` of a small integer field and quantiles are accurate to ~2.5 %;
* **window**: samples go into a *current* hash; when it holds ``POLL_LEARN_WINDOW`` samples
  it becomes the *previous* one (``RENAME``) and a new current one starts. Quantiles are read
  over both, i.e. the last 1–2 windows of jobs, so the sketch follows upstream when it gets
  faster or slower, and memory stays O(buckets) per kind whatever the traffic;
* **early**: how many of those jobs were found already finished at a check the learned
  schedule had pushed later than the 10 % rule would have. If that share grows well past
  ``POLL_LEARN_QUANTILE`` (upstream suddenly got faster), the schedule stops trusting the
  sketch until the window has moved on.

Keys: ``rcw:runtimes:<model>|<W>x<H>|<single|set>:cur`` and ``…:old`` for the total,
``rcw:runtimes:<model>|<W>x<H>|<single|set>|run:cur`` and ``…:old`` for the run (fields:
bucket index → count, ``n``, ``early``), written only by ``scripts/learn.lua``; all expire after
:data:`SKETCH_TTL_S` without samples. Workers cache what they read for
:data:`CACHE_S`: one read per kind per worker every few seconds, never one per check.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import redis

from api_contracts.inputs import GenerationInput
from worker.constants import RUNTIMES_KEY_PREFIX
from worker.jobs.store import script
from worker.services.redis_client import as_text

#: Lower edge of bucket 0, in seconds.
BUCKET_BASE_S: Final = 0.1
#: Each bucket is this much wider than the one before.
BUCKET_GROWTH: Final = 1.05
#: Last bucket (≈ 3.2 h); longer samples land in it.
MAX_BUCKET: Final = 240
#: How long a worker trusts a sketch it read before reading it again ...
CACHE_S: Final = 10.0
#: ... or, while the kind has too few samples to be used, this long (it is being learned).
LEARNING_CACHE_S: Final = 1.0
#: A kind with no new sample for this long is forgotten.
SKETCH_TTL_S: Final = 7 * 24 * 3600
#: A kind's run-time sketch is learned under the kind's name plus this.
RUN_SUFFIX: Final = "|run"

_LOG_GROWTH: Final = math.log(BUCKET_GROWTH)


def bucket_of(seconds: float) -> int:
    """The bucket a run time of ``seconds`` falls in."""
    if seconds <= BUCKET_BASE_S:
        return 0
    return min(MAX_BUCKET, int(math.log(seconds / BUCKET_BASE_S) / _LOG_GROWTH))


def bucket_value(index: int) -> float:
    """The run time a bucket stands for (its geometric middle)."""
    return float(BUCKET_BASE_S * BUCKET_GROWTH ** (index + 0.5))


def runtime_kind(model_id: str, inp: GenerationInput) -> str:
    """The kind a job's run time is learned under: model, size and force_single."""
    width, height = inp.dimensions
    return f"{model_id}|{width}x{height}|{'single' if inp.force_single else 'set'}"


@dataclass(frozen=True)
class Sketch:
    """Learned run times of one kind: ``(bucket, count)`` pairs, sorted by bucket."""

    counts: tuple[tuple[int, int], ...]
    #: of those jobs, how many were found finished at a check pushed past the 10 % rule
    early: int = 0
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        running, total = [], 0
        for _, count in self.counts:
            total += count
            running.append(total)
        object.__setattr__(self, "_cumulative", tuple(running))

    @classmethod
    def from_samples(cls, samples: list[float], early: int = 0) -> Sketch:
        """A sketch of these run times (tests, benchmarks)."""
        tally: dict[int, int] = {}
        for seconds in samples:
            index = bucket_of(seconds)
            tally[index] = tally.get(index, 0) + 1
        return cls(tuple(sorted(tally.items())), early)

    @classmethod
    def from_fields(cls, *hashes: Mapping[str, str]) -> Sketch:
        """The sketch of the current and previous window's hash fields together."""
        tally: dict[int, int] = {}
        early = 0
        for fields in hashes:
            for name, value in fields.items():
                if name == "early":
                    early += int(value)
                elif name.isdigit():
                    tally[int(name)] = tally.get(int(name), 0) + int(value)
        return cls(tuple(sorted(tally.items())), early)

    @property
    def total(self) -> int:
        """Samples in the sketch."""
        return self._cumulative[-1] if self._cumulative else 0

    @property
    def early_share(self) -> float:
        """Share of the sketch's jobs found finished earlier than the schedule expected."""
        return self.early / self.total if self.total else 0.0

    def quantile(self, q: float) -> float:
        """The run time that a share ``q`` of the samples did not exceed."""
        if not self.counts:
            raise ValueError("empty sketch")
        rank = max(1, math.ceil(min(max(q, 0.0), 1.0) * self.total))
        return bucket_value(self.counts[bisect.bisect_left(self._cumulative, rank)][0])

    def cdf(self, seconds: float, spread: float = 0.0) -> float:
        """P(run time + U·``spread`` ≤ ``seconds``), U uniform on [0, 1): the share of jobs
        done by then when their start is only known to lie within ``spread`` seconds."""
        total = self.total
        if not total:
            return 0.0
        done = 0.0
        for index, count in self.counts:
            value = bucket_value(index)
            if value > seconds:
                break
            done += count if spread <= 0 else count * min(1.0, (seconds - value) / spread)
        return done / total

    def quantile_spread(self, q: float, spread: float) -> float:
        """:meth:`quantile` of run time + U·``spread`` (bisection on :meth:`cdf`)."""
        low = self.quantile(q)
        if spread <= 0:
            return low
        high = low + spread
        for _ in range(30):
            mid = (low + high) / 2
            if self.cdf(mid, spread) < q:
                low = mid
            else:
                high = mid
            if high - low < 0.01:
                break
        return high


@dataclass(frozen=True)
class Learned:
    """What is known of a kind's timings (None: nothing yet)."""

    #: submit → done, queue wait included
    total: Sketch | None = None
    #: start → done
    run: Sketch | None = None


@dataclass(frozen=True)
class Samples:
    """What one finished job teaches its kind (:func:`teach`)."""

    total_s: float
    #: None when its start is not known closely enough
    run_s: float | None = None
    #: found finished at a check the learned schedule had pushed late: counted on the sketch
    #: that planned that check (the run's for a job seen queued, else the total's)
    total_early: bool = False
    run_early: bool = False


class RuntimeBook(Protocol):
    """Where run times are learned and read."""

    def sketch(self, kind: str) -> Sketch | None:
        """The kind's sketch (possibly a few seconds old), or None if nothing is known."""
        ...

    def learn(self, kind: str, seconds: float, *, early: bool) -> None:
        """Add one finished job's run time."""
        ...


class NoRuntimes:
    """Learns nothing, knows nothing: the schedule behaves as on a cold start."""

    def sketch(self, kind: str) -> Sketch | None:
        """Nothing known."""
        return None

    def learn(self, kind: str, seconds: float, *, early: bool) -> None:
        """Forgotten."""


class MemoryRuntimes:
    """:class:`RuntimeBook` in process memory (unit tests, simulations), same window rule."""

    def __init__(self, window: int = 500) -> None:
        self.window = window
        self._cur: dict[str, dict[str, int]] = {}
        self._old: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def sketch(self, kind: str) -> Sketch | None:
        """The current and previous window together."""
        with self._lock:
            cur = {k: str(v) for k, v in self._cur.get(kind, {}).items()}
            old = {k: str(v) for k, v in self._old.get(kind, {}).items()}
        sketch = Sketch.from_fields(cur, old)
        return sketch if sketch.total else None

    def learn(self, kind: str, seconds: float, *, early: bool) -> None:
        """One sample; the window turns over as in ``learn.lua``."""
        with self._lock:
            cur = self._cur.setdefault(kind, {})
            index = str(bucket_of(seconds))
            cur[index] = cur.get(index, 0) + 1
            cur["n"] = cur.get("n", 0) + 1
            if early:
                cur["early"] = cur.get("early", 0) + 1
            if cur["n"] >= self.window:
                self._old[kind] = self._cur.pop(kind)


class RedisRuntimes:
    """:class:`RuntimeBook` in Redis (``scripts/learn.lua``), read through a short cache."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        window: int,
        min_samples: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = client
        self.window = window
        self.min_samples = min_samples
        self.clock = clock
        self._learn = client.register_script(script("learn.lua"))
        self._cache: dict[str, tuple[float, Sketch | None]] = {}
        self._lock = threading.Lock()

    def sketch(self, kind: str) -> Sketch | None:
        """Read at most once per :data:`CACHE_S` per kind (:data:`LEARNING_CACHE_S` while
        it has fewer than ``min_samples``)."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(kind)
        if cached is not None:
            known = cached[1] is not None and cached[1].total >= self.min_samples
            if now - cached[0] < (CACHE_S if known else LEARNING_CACHE_S):
                return cached[1]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key(kind, "cur"))
            pipe.hgetall(_key(kind, "old"))
            cur, old = pipe.execute()
        sketch = Sketch.from_fields(_text(cur), _text(old))
        found = sketch if sketch.total else None
        with self._lock:
            self._cache[kind] = (now, found)
        return found

    def learn(self, kind: str, seconds: float, *, early: bool) -> None:
        """One ``learn.lua`` call."""
        self._learn(
            keys=[_key(kind, "cur"), _key(kind, "old")],
            args=[bucket_of(seconds), "1" if early else "0", self.window, SKETCH_TTL_S],
        )


def _key(kind: str, generation: str) -> str:
    return f"{RUNTIMES_KEY_PREFIX}{kind}:{generation}"


def _text(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in raw.items()}


def read(book: RuntimeBook, kind: str) -> Learned:
    """Both sketches of ``kind``."""
    return Learned(book.sketch(kind), book.sketch(kind + RUN_SUFFIX))


def teach(book: RuntimeBook, kind: str, samples: Samples) -> None:
    """Add one finished job's samples to ``kind``'s sketches."""
    book.learn(kind, samples.total_s, early=samples.total_early)
    if samples.run_s is not None:
        book.learn(kind + RUN_SUFFIX, samples.run_s, early=samples.run_early)
