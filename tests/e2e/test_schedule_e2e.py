"""The learned status schedule with a real worker: a first wave of jobs on the 10 % rule
teaches the worker how long generations of their kind take; a second wave of the same kind
is checked fewer times, and every job still succeeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api_contracts.jobs import JobStatus
from worker.devtools.emulator import EmulatorConfig

from .conftest import TOKEN, Stack, assert_clean_log

pytestmark = pytest.mark.e2e

WAVE = 30


@pytest.fixture(scope="module")
def stack(stack_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = stack_factory(
        EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=3.0, run_sigma=0.15, capacity=100, seed=5),
        POLL_LEARN_MIN_SAMPLES="20",
    )
    s.start_worker()
    yield s
    assert_clean_log(s)


def wave(stack: Stack, size: str) -> list[int]:
    """Run WAVE jobs of one kind to the end; their status calls."""
    ids = [
        stack.producer.enqueue(
            {"input": {"prompt": f"wave {i}", "size": size, "force_single": True}}
        ).id
        for i in range(WAVE)
    ]
    records = [stack.wait(job_id, timeout=60) for job_id in ids]
    assert all(r.status == JobStatus.SUCCEEDED for r in records), [r.error for r in records]
    return [r.status_calls for r in records]


def test_a_second_wave_of_a_learned_kind_is_checked_less(stack: Stack) -> None:
    cold = wave(stack, "1024x1024")
    keys = [k.decode() for k in stack.redis.scan_iter("rcw:runtimes:*")]
    assert any("|1024x1024|single:" in k for k in keys), keys
    warm = wave(stack, "1024x1024")
    # the 10 % rule (0.2 s steps) checks a 3 s generation ~12 times; learned: a handful
    assert sum(warm) < 0.6 * sum(cold), (cold, warm)
    # another size is another kind: nothing learned for it yet, so the rule again
    other = wave(stack, "2048x2048")
    assert sum(other) > 0.8 * sum(cold), (cold, other)
