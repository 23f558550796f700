"""The learned status schedule: the run-time sketch, and the pure functions that plan checks
around it (tables), plus a seeded simulation of many jobs against the 10 % rule."""

from __future__ import annotations

import math
import random

import pytest

from api_contracts.inputs import GenerationInput
from api_contracts.jobs import JobStatus
from api_contracts.upstream import StatusResponse
from worker.jobs import decisions as d
from worker.jobs.runtimes import (
    Learned,
    MemoryRuntimes,
    NoRuntimes,
    Samples,
    Sketch,
    bucket_of,
    bucket_value,
    read,
    runtime_kind,
    teach,
)
from worker.settings import PollSettings

POLL = PollSettings(initial_delay_s=1, min_interval_s=1, max_interval_s=30)
RUNNING, QUEUED = JobStatus.IN_PROGRESS, JobStatus.IN_QUEUE
QUANTILE = POLL.learn_quantile


def lognormal(n: int, median: float = 25.0, sigma: float = 0.3, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [median * math.exp(sigma * rng.gauss(0, 1)) for _ in range(n)]


SKETCH = Sketch.from_samples(lognormal(400))
#: The same run times for both: a job that never waits in upstream's queue.
BOTH = Learned(total=SKETCH, run=SKETCH)
#: Queue waits make the total (submit → done) longer than the run (start → done).
TOTAL = Sketch.from_samples(lognormal(400, median=40.0))
APART = Learned(total=TOTAL, run=SKETCH)


# ------------------------------------------------------------------------------ the sketch


@pytest.mark.parametrize("seconds", [0.05, 0.1, 0.5, 1.0, 7.3, 25.0, 600.0, 3600.0])
def test_buckets_are_within_five_percent(seconds: float) -> None:
    value = bucket_value(bucket_of(seconds))
    assert abs(value - seconds) / seconds < 0.05 or seconds <= 0.1


def test_quantiles_follow_the_samples() -> None:
    samples = sorted(lognormal(2000))
    sketch = Sketch.from_samples(samples)
    assert sketch.total == 2000
    for q in (0.02, 0.5, 0.98):
        exact = samples[int(q * len(samples))]
        assert sketch.quantile(q) == pytest.approx(exact, rel=0.05)
    assert 0.5 <= sketch.cdf(sketch.quantile(0.5)) < 0.6  # the median's bucket, whole


def test_a_spread_start_moves_the_quantile_later_by_less_than_the_spread() -> None:
    low = SKETCH.quantile(0.02)
    spread = SKETCH.quantile_spread(0.02, 10.0)
    assert low < spread < low + 10.0
    assert SKETCH.cdf(spread, 10.0) == pytest.approx(0.02, abs=0.005)


def test_an_empty_sketch_has_no_quantile() -> None:
    with pytest.raises(ValueError, match="empty"):
        Sketch(()).quantile(0.5)


def test_fields_of_both_windows_add_up() -> None:
    sketch = Sketch.from_fields({"100": "3", "n": "3", "early": "1"}, {"100": "2", "101": "5"})
    assert sketch.counts == ((100, 5), (101, 5)) and sketch.total == 10 and sketch.early == 1


def test_the_memory_book_turns_its_window_over() -> None:
    book = MemoryRuntimes(window=10)
    assert book.sketch("k") is None
    for _ in range(10):
        book.learn("k", 5.0, early=False)  # a full window: becomes the previous one
    for _ in range(3):
        book.learn("k", 50.0, early=True)
    sketch = book.sketch("k")
    assert sketch is not None and sketch.total == 13 and sketch.early == 3
    for _ in range(10):
        book.learn("k", 50.0, early=False)  # the 5 s window is gone
    sketch = book.sketch("k")
    assert sketch is not None and sketch.quantile(0.01) == pytest.approx(50.0, rel=0.05)
    assert NoRuntimes().sketch("k") is None


def test_kinds_are_model_size_and_force_single() -> None:
    inp = GenerationInput.model_validate({"prompt": "x", "force_single": True})
    other = GenerationInput.model_validate({"prompt": "y", "force_single": False})
    assert runtime_kind("m", inp) != runtime_kind("m", other)
    assert runtime_kind("m", inp).startswith("m|") and runtime_kind("m", inp).endswith("|single")


# ------------------------------------------------------------------------------ trust


def test_the_sketch_is_used_only_with_enough_samples_and_few_surprises() -> None:
    assert d.learned_sketch(SKETCH, POLL) is SKETCH
    assert d.learned_sketch(None, POLL) is None
    assert d.learned_sketch(SKETCH, POLL.model_copy(update={"learn": False})) is None
    few = Sketch.from_samples(lognormal(49))
    assert d.learned_sketch(few, POLL) is None
    surprised = Sketch(SKETCH.counts, early=int(SKETCH.total * (3 * QUANTILE + 0.01)))
    assert d.learned_sketch(surprised, POLL) is None  # > 3 × learn_quantile found early


# ------------------------------------------------------------------------------ the plan


def test_first_check_waits_for_the_low_quantile() -> None:
    countdown, learned = d.first_check(SKETCH, POLL)
    assert learned and countdown == pytest.approx(SKETCH.quantile(QUANTILE))
    assert 10 < countdown < 20
    assert d.first_check(None, POLL) == (1.0, False)
    fast = Sketch.from_samples([0.5] * 100)  # everything done before the initial delay
    assert d.first_check(fast, POLL) == (1.0, False)
    capped = PollSettings(initial_delay_s=1, min_interval_s=1, max_interval_s=5)
    assert d.first_check(SKETCH, capped) == (countdown, True)  # the cap is the rule's


Q_LOW = SKETCH.quantile(QUANTILE)


@pytest.mark.parametrize(
    ("status", "seen", "expected", "learned"),
    [
        # cold or past the plan: the 10 % rule (jitter 0)
        (RUNNING, d.Observed(50.0, 0.0, 14.0), 5.0, False),
        # running since the submit, before the low quantile: jump to it
        (RUNNING, d.Observed(2.0, 0.0, 2.0), Q_LOW - 2.0, True),
        # queued now: it cannot finish before now + run time
        (QUEUED, d.Observed(30.0, 30.0, None), Q_LOW, True),
        # seen queued at 30 s, running at 35 s: the plan counts from 30 s, start spread 5 s
        (RUNNING, d.Observed(35.0, 30.0, 35.0), SKETCH.quantile_spread(QUANTILE, 5.0) - 5.0, True),
        # far past anything learned: 10 % rule, capped by max_interval_s
        (RUNNING, d.Observed(1000.0, 0.0, 14.0), 30.0, False),
    ],
)
def test_next_check(status: JobStatus, seen: d.Observed, expected: float, learned: bool) -> None:
    countdown, was_learned = d.next_check(status, seen, BOTH, POLL, jitter=0.0)
    assert countdown == pytest.approx(expected, rel=1e-3)
    assert was_learned is learned


T_LOW = TOTAL.quantile(QUANTILE)


@pytest.mark.parametrize(
    ("status", "seen", "learned", "expected", "planned"),
    [
        # never seen queued: its queue wait is unseen, so the total plans
        (RUNNING, d.Observed(2.0, 0.0, 2.0), APART, T_LOW - 2.0, True),
        # queued, or seen queued: its run is ahead, so the run time plans
        (QUEUED, d.Observed(30.0, 30.0, None), APART, Q_LOW, True),
        (
            RUNNING,
            d.Observed(35.0, 30.0, 35.0),
            APART,
            SKETCH.quantile_spread(QUANTILE, 5) - 5,
            True,
        ),
        # the sketch that would plan is not known yet: the 10 % rule
        (RUNNING, d.Observed(2.0, 0.0, 2.0), Learned(run=SKETCH), 1.0, False),
        (QUEUED, d.Observed(30.0, 30.0, None), Learned(total=TOTAL), 3.0, False),
        (RUNNING, d.Observed(35.0, 30.0, 35.0), Learned(total=TOTAL), 3.5, False),
    ],
)
def test_next_check_plans_with_the_total_or_the_run(
    status: JobStatus, seen: d.Observed, learned: Learned, expected: float, planned: bool
) -> None:
    countdown, was_learned = d.next_check(status, seen, learned, POLL, jitter=0.0)
    assert countdown == pytest.approx(expected, rel=1e-3)
    assert was_learned is planned


def test_next_check_never_waits_less_than_the_ten_percent_rule() -> None:
    for elapsed in (1.0, 5.0, 12.0, 20.0, 40.0, 200.0):
        for status in (RUNNING, QUEUED):
            seen = d.Observed(elapsed, 0.0 if status == RUNNING else elapsed, None)
            countdown, _ = d.next_check(status, seen, BOTH, POLL, jitter=0.3)
            assert countdown >= d.poll_interval(elapsed, POLL, 0.3) - 1e-9
            assert countdown <= max(POLL.max_interval_s, SKETCH.quantile(QUANTILE))


def test_a_learned_kind_shortens_the_rule_less() -> None:
    seen = d.Observed(50.0, 0.0, 14.0)  # past the plan: the 10 % rule
    cold, _ = d.next_check(RUNNING, seen, Learned(), POLL, jitter=0.999)
    learned, _ = d.next_check(RUNNING, seen, BOTH, POLL, jitter=0.999)
    assert cold == pytest.approx(5.0 * 0.9, rel=1e-3)  # up to 10 % shorter
    assert learned == pytest.approx(5.0 * 0.98, rel=1e-3)  # up to 2 % shorter
    assert learned <= 5.0  # never longer than the rule


def test_observed_marks_the_queue_and_the_start() -> None:
    seen = d.Observed(5.0).seen("in_queue")
    assert (seen.queued_s, seen.started_s) == (5.0, None)
    later = d.Observed(9.0, seen.queued_s, None).seen("in_progress")
    assert (later.queued_s, later.started_s, later.start_spread) == (5.0, 9.0, 4.0)
    assert d.Observed(12.0, 5.0, 9.0).seen("in_progress").started_s == 9.0  # the first one
    assert d.Observed(3.0).seen("in_progress").start_spread == 0.0  # never queued


@pytest.mark.parametrize(
    ("seen", "previous", "total", "run"),
    [
        # never seen queued, first seen running at 14 s: its start, anywhere in (0, 14], is
        # too vague for a ~18 s run time (a queue wait may hide in it); the total is known
        (d.Observed(26.0, 0.0, 14.0), 24.0, 25.0, None),
        # ... seen running at 1 s: started in (0, 1]
        (d.Observed(26.0, 0.0, 1.0), 24.0, 25.0, 24.5),
        (d.Observed(40.0, 10.0, 14.0), 38.0, 39.0, 39.0 - 12.0),  # started in (10, 14]
        (d.Observed(30.0, 10.0, 30.0), 10.0, 20.0, None),  # queued → done: run time unknown
        (d.Observed(9.0, 0.0, 9.0), 0.0, 4.5, None),  # done at the first check
    ],
)
def test_learned_samples(
    seen: d.Observed, previous: float, total: float, run: float | None
) -> None:
    samples = d.learned_samples(seen, previous, POLL)
    assert samples.total_s == pytest.approx(total)
    assert samples.run_s == (None if run is None else pytest.approx(run))


def test_found_early_counts_on_the_sketch_that_planned() -> None:
    never_queued = d.learned_samples(d.Observed(14.0, 0.0, 14.0), 0.0, POLL)
    assert (never_queued.total_early, never_queued.run_early) == (True, False)
    queued = d.learned_samples(d.Observed(40.0, 10.0, 14.0), 20.0, POLL)  # 20 s → 40 s
    assert (queued.total_early, queued.run_early) == (False, True)
    ruled = d.learned_samples(d.Observed(27.5, 0.0, 14.0), 25.0, POLL)
    assert not (ruled.total_early or ruled.run_early)


def test_teach_feeds_both_sketches_of_a_kind() -> None:
    book = MemoryRuntimes()
    teach(book, "k", Samples(total_s=30.0, run_s=25.0, run_early=True))
    teach(book, "k", Samples(total_s=31.0))
    learned = read(book, "k")
    assert learned.total is not None and learned.total.total == 2 and learned.total.early == 0
    assert learned.run is not None and learned.run.total == 1 and learned.run.early == 1
    assert read(book, "other") == Learned()


def test_found_early_only_after_a_learned_jump() -> None:
    assert d.found_early(d.Observed(14.0, 0.0, 14.0), 0.0, POLL)  # first check at 14 s
    assert not d.found_early(d.Observed(1.0, 0.0, 1.0), 0.0, POLL)  # first check at 1 s
    assert not d.found_early(d.Observed(27.5, 0.0, 14.0), 25.0, POLL)  # 10 % rule step


def test_decide_poll_uses_the_sketch_for_running_jobs() -> None:
    running = StatusResponse.model_validate({"request_id": "r", "status": "in_progress"})
    seen = d.Observed(2.0).seen("in_progress")
    decision = d.decide_poll(
        status=QUEUED,
        answer=running,
        elapsed_s=2.0,
        age_s=2.0,
        deadline_s=1800,
        error_streak=0,
        poll=POLL,
        jitter=0.0,
        seen=seen,
        learned=BOTH,
    )
    assert isinstance(decision, d.Reschedule) and decision.learned
    assert decision.countdown == pytest.approx(Q_LOW - 2.0)
    assert decision.status == RUNNING


# ------------------------------------------------------------------------------ many jobs


def test_many_jobs_fewer_calls_within_the_bound_at_p95() -> None:
    rng = random.Random(7)
    runtimes = lognormal(1500, seed=3)
    queues = [rng.expovariate(1 / 5.0) if rng.random() < 0.5 else 0.5 for _ in runtimes]
    learned_calls = rule_calls = 0
    late = []
    for runtime, queue in zip(runtimes, queues, strict=True):
        run = d.follow_schedule(runtime, queue, BOTH, POLL, rng.random)
        learned_calls += run.calls
        late.append(run.delay_s / max(1.0, 0.1 * (queue + runtime)))
        rule_calls += d.follow_schedule(runtime, queue, Learned(), POLL, rng.random).calls
    late.sort()
    assert late[int(0.95 * len(late))] <= 1.0  # p95 of delay / max(1 s, 10 % of run time)
    assert sum(x > 1.0 for x in late) / len(late) < 0.05
    assert learned_calls < 0.45 * rule_calls


def test_a_job_much_slower_than_learned_stays_within_ten_percent() -> None:
    rng = random.Random(1)
    for runtime in (80.0, 150.0, 400.0):
        run = d.follow_schedule(runtime, 0.5, BOTH, POLL, rng.random)
        assert run.delay_s <= max(1.0, 0.1 * (runtime + 0.5))
        assert not (run.samples.total_early or run.samples.run_early)


def test_learning_from_the_schedule_itself_converges() -> None:
    """Cold start, then only the samples the poll step would record: without queue waits the
    learned median is the true one; with them, the schedule still keeps its bound."""
    rng = random.Random(5)
    book = MemoryRuntimes(window=500)
    for runtime in lognormal(300, seed=9):
        run = d.follow_schedule(runtime, 0.0, read(book, "k"), POLL, rng.random)
        teach(book, "k", run.samples)
    learned = read(book, "k")
    assert learned.total is not None and learned.total.quantile(0.5) == pytest.approx(
        25.0, rel=0.05
    )
    # run times are learned from the cold start's checks (a start known within 1 s) only
    assert learned.run is not None and 50 <= learned.run.total < 100
    assert learned.run.quantile(0.5) == pytest.approx(25.0, rel=0.1)

    queued = MemoryRuntimes(window=500)
    late, calls, rule_calls = [], 0, 0
    for i, runtime in enumerate(lognormal(1200, seed=11)):
        queue = rng.expovariate(1 / 5.0)
        run = d.follow_schedule(runtime, queue, read(queued, "k"), POLL, rng.random)
        teach(queued, "k", run.samples)
        if i >= 200:  # after the warm-up
            late.append(run.delay_s / max(1.0, 0.1 * (queue + runtime)))
            calls += run.calls
            rule_calls += d.follow_schedule(runtime, queue, Learned(), POLL, rng.random).calls
    late.sort()
    assert late[int(0.95 * len(late))] <= 1.0
    assert calls < 0.45 * rule_calls
