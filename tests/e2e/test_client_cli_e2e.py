"""The producer side against a real worker: worker.producer.client.Client and the CLI commands
submit / status / wait / cancel, including every cancel path and every error message."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from api_contracts.jobs import JobRecord, JobRequest, JobStatus, WebhookState
from api_contracts.messages import QUEUE_SUBMIT
from worker.cli import main
from worker.devtools.embedded import WorkerProcess, free_port
from worker.devtools.emulator import EmulatorConfig, FaultRule
from worker.errors import JobNotFoundError
from worker.jobs.state import JobChange, transition_allowed
from worker.producer.client import (
    Client,
    IdempotencyConflictError,
    InvalidRequestError,
    NotCancellableError,
    RedisUnavailableError,
    TryAgainError,
    WaitTimeoutError,
)

from .conftest import TOKEN, Stack, assert_clean_log

pytestmark = pytest.mark.e2e

FAST = {"queue_s": 0.2, "run_s": 0.3}


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[..., Stack]) -> Iterator[Stack]:
    """A stack with a worker on every queue."""
    s = stack_factory(EmulatorConfig(token=TOKEN, capacity=8, seed=5, **FAST))
    s.start_worker()
    yield s
    assert_clean_log(s)


@pytest.fixture(scope="module")
def idle_stack(stack_factory: Callable[..., Stack]) -> Stack:
    """A stack whose worker does not consume runcomfy.submit: jobs stay ``queued``, and the
    submit list's length tells exactly what producers enqueued. Notifications still go out."""
    s = stack_factory(EmulatorConfig(token=TOKEN, seed=6, **FAST))
    worker = WorkerProcess(
        s.env,
        args=["-Q", "runcomfy.poll,runcomfy.archive,runcomfy.notify", "-c", "4",
              "--without-mingle", "--without-gossip"],
        log_path=str(s.log_dir / "idle-worker.log"),
    )  # fmt: skip
    s.workers.append(worker)
    worker.start()
    return s


@pytest.fixture(autouse=True)
def reset_emulators(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("stack", "idle_stack"):
        if name in request.fixturenames:
            s: Stack = request.getfixturevalue(name)
            s.emulator.set_faults([])
            s.emulator.update_config(**FAST)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(settings=stack.app.settings) as c:
        yield c


@pytest.fixture
def idle_client(idle_stack: Stack) -> Iterator[Client]:
    with Client(settings=idle_stack.app.settings) as c:
        yield c


def cli(stack: Stack | None, *args: str, redis_url: str | None = None) -> Result:
    """Run the CLI in-process with the stack's Redis (or ``redis_url``) in the environment."""
    env = {"ALLOW_PRIVATE_NETWORKS": "true"}
    url = redis_url or (stack.redis_url if stack else None)
    if url:
        env["REDIS_URL"] = url
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def job_keys(stack: Stack) -> set[bytes]:
    return set(stack.redis.scan_iter(match="rcw:job:*"))


def webhook_events(stack: Stack, job_id: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Verified events for ``job_id``, once at least one arrived."""
    deliveries = stack.receiver.wait_for(
        lambda ds: any(d.verified and d.job_id == job_id for d in ds), timeout=timeout
    )
    return [d.event for d in deliveries if d.verified and d.job_id == job_id and d.event]


# ====================================================================== client: submit/get/wait
def test_submit_get_wait_reports_every_change(stack: Stack, client: Client) -> None:
    record = client.submit(
        prompt="a lighthouse at dusk",
        size="1024x1024",
        scale=0.7,
        force_single=True,
        webhook_url=stack.receiver.url,
        metadata={"order": "42"},
    )
    assert record.status == JobStatus.QUEUED
    assert record.request is not None and record.request.input.size == "1024x1024(1:1)"
    seen: list[JobRecord] = []
    final = client.wait(record.id, timeout=30, on_update=seen.append)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert final.outputs and final.outputs[0].s3_uri.startswith("s3://")
    statuses = [r.status for r in seen]
    assert statuses[-1] == JobStatus.SUCCEEDED
    assert len(statuses) >= 2  # the first read and at least the final change
    assert all(transition_allowed(a, b) for a, b in itertools.pairwise(statuses))
    assert client.get(record.id).status == JobStatus.SUCCEEDED
    assert client.get(record.id).metadata == {"order": "42"}
    # a final job: wait returns at once, with one update
    again: list[JobRecord] = []
    assert client.wait(record.id, timeout=1, on_update=again.append).status == JobStatus.SUCCEEDED
    assert len(again) == 1


def test_submit_takes_a_job_request_or_its_json(client: Client) -> None:
    request = JobRequest.model_validate({"input": {"prompt": "a cube", "size": "1024x1024"}})
    first = client.submit(request)
    second = client.submit({"input": {"prompt": "a sphere", "width×height": "1024x1024(1:1)"}})
    assert first.request == request
    assert second.request is not None and second.request.input.prompt == "a sphere"
    with pytest.raises(TypeError, match="not both"):
        client.submit(request, prompt="x")
    assert client.wait(second.id, timeout=30).status == JobStatus.SUCCEEDED


def test_wait_uses_pubsub_not_polling(idle_stack: Stack, idle_client: Client) -> None:
    """An idle wait re-reads about once a second; it does not hammer Redis."""
    record = idle_client.submit(prompt="never submitted: no submit consumer")
    idle_stack.redis.config_resetstat()
    with pytest.raises(WaitTimeoutError, match=r"still queued after 2\.5s") as info:
        idle_client.wait(record.id, timeout=2.5)
    assert info.value.record.status == JobStatus.QUEUED
    stats = idle_stack.redis.info("commandstats")
    reads = stats.get("cmdstat_hgetall", {}).get("calls", 0)
    assert 1 <= reads <= 5, reads


def test_idempotency_same_request_same_job_different_request_refused(
    stack: Stack, client: Client
) -> None:
    before = stack.emulator.counters()["submits"]
    fields: dict[str, Any] = {
        "prompt": "once only",
        "size": "1024x1024",
        "idempotency_key": "ord-7",
    }
    first = client.submit(**fields)
    second = client.submit(**fields)
    assert second.id == first.id
    assert client.wait(first.id, timeout=30).status == JobStatus.SUCCEEDED
    assert client.submit(**fields).id == first.id  # also once it is final
    assert stack.emulator.counters()["submits"] - before == 1
    with pytest.raises(IdempotencyConflictError, match="ord-7"):
        client.submit(prompt="something else", idempotency_key="ord-7")
    result = cli(stack, "submit", "--prompt", "something else", "--idempotency-key", "ord-7")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: idempotency_key:") and "ord-7" in result.stderr
    result = cli(stack, "submit", "--prompt", "once only", "--size", "1024x1024",
                 "--idempotency-key", "ord-7", "--json")  # fmt: skip
    assert result.exit_code == 0 and JobRecord.model_validate_json(result.stdout).id == first.id


# ====================================================================== bad input, nothing queued
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--size", "9x9"],
            "error: input.size: '9x9' is not an allowed size; allowed: 1024x1024(1:1), ",
        ),
        (["--scale", "7"], "error: input.scale: Input should be less than or equal to 1"),
        (["--scale", "lots"], "error: input.scale: 'lots' is not a number between 0 and 1"),
        (["--metadata", "novalue"], "error: metadata: 'novalue' is not KEY=VALUE"),
        (["--webhook-url", "ftp://example.com/x"], "error: webhook_url: "),
        (["--idempotency-key", "has spaces"], "error: idempotency_key: "),
    ],
)
def test_invalid_input_exits_2_naming_the_field_and_queues_nothing(
    idle_stack: Stack, args: list[str], expected: str
) -> None:
    before_list = idle_stack.redis.llen(QUEUE_SUBMIT)
    before_jobs = job_keys(idle_stack)
    result = cli(idle_stack, "submit", "--prompt", "a cube", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert idle_stack.redis.llen(QUEUE_SUBMIT) == before_list
    assert job_keys(idle_stack) == before_jobs


def test_invalid_input_from_python_names_fields_and_queues_nothing(
    idle_stack: Stack, idle_client: Client
) -> None:
    before_list = idle_stack.redis.llen(QUEUE_SUBMIT)
    before_jobs = job_keys(idle_stack)
    with pytest.raises(InvalidRequestError) as info:
        idle_client.submit(prompt="", size="9x9", scale=2)
    fields = [field for field, _ in info.value.errors]
    assert fields == ["input.prompt", "input.size", "input.scale"]
    assert "allowed: 1024x1024(1:1)" in dict(info.value.errors)["input.size"]
    with pytest.raises(InvalidRequestError, match=r"input\.prompt: Field required"):
        idle_client.submit(size="1024x1024")
    assert cli(idle_stack, "submit").stderr == "error: input.prompt: Field required\n"
    assert idle_stack.redis.llen(QUEUE_SUBMIT) == before_list
    assert job_keys(idle_stack) == before_jobs


# ====================================================================== unreachable, unknown
def test_unreachable_redis_is_one_clear_line() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    for args in (
        ["status", "abc"],
        ["wait", "abc"],
        ["cancel", "abc"],
        ["submit", "--prompt", "x"],
    ):
        result = cli(None, *args, redis_url=url)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:")
        assert result.stderr.count("\n") == 1 and "hunter2" not in result.output
    with Client(redis_url=url) as client, pytest.raises(RedisUnavailableError):
        client.get("abc")


def test_unknown_job_is_a_clear_message(stack: Stack, client: Client) -> None:
    for command in ("status", "wait", "cancel"):
        result = cli(stack, command, "no-such-job")
        assert result.exit_code == 1
        assert result.stderr == "error: no job 'no-such-job' (never created, or expired)\n"
    with pytest.raises(JobNotFoundError):
        client.get("no-such-job")
    with pytest.raises(JobNotFoundError):
        client.wait("no-such-job", timeout=1)


# ====================================================================== cancel
def test_cancel_queued_never_reaches_upstream_and_sends_job_cancelled(
    idle_stack: Stack, idle_client: Client
) -> None:
    before = idle_stack.emulator.counters()
    record = idle_client.submit(prompt="cancel me", webhook_url=idle_stack.receiver.url)
    cancelled = idle_client.cancel(record.id)
    assert cancelled.status == JobStatus.CANCELLED
    assert cancelled.error is not None and cancelled.error.code == "cancelled"
    events = webhook_events(idle_stack, record.id)
    assert [e["type"] for e in events] == ["job.cancelled"]
    # cancelling again: a final job comes back unchanged
    assert idle_client.cancel(record.id).status == JobStatus.CANCELLED
    # and from the shell
    other = idle_client.submit(prompt="cancel me too")
    result = cli(idle_stack, "cancel", other.id)
    assert result.exit_code == 0 and f"job {other.id} cancelled (was queued)" in result.stdout
    result = cli(idle_stack, "cancel", other.id)
    assert result.exit_code == 0 and "already cancelled; nothing to cancel" in result.stdout
    after = idle_stack.emulator.counters()
    assert (after["submits"], after["cancels"]) == (before["submits"], before["cancels"])


def test_cancel_in_upstream_queue_is_done_by_the_worker(stack: Stack, client: Client) -> None:
    stack.emulator.update_config(queue_s=30)
    before = stack.emulator.counters()
    record = client.submit(prompt="long queue", webhook_url=stack.receiver.url)
    stack.wait(record.id, lambda r: r.status == JobStatus.IN_QUEUE, timeout=20)
    cancelled = client.cancel(record.id, timeout=20)
    assert cancelled.status == JobStatus.CANCELLED
    after = stack.emulator.counters()
    assert after["cancels"] - before["cancels"] == 1
    assert after["cancelled_by_client"] - before["cancelled_by_client"] == 1
    assert [e["type"] for e in webhook_events(stack, record.id)] == ["job.cancelled"]


def test_cancel_in_progress_is_not_cancellable(stack: Stack, client: Client) -> None:
    stack.emulator.update_config(queue_s=0, run_s=6)
    record = client.submit(prompt="already running")
    stack.wait(record.id, lambda r: r.status == JobStatus.IN_PROGRESS, timeout=20)
    before = stack.emulator.counters()["cancels"]
    with pytest.raises(NotCancellableError, match="in_progress: not cancellable") as info:
        client.cancel(record.id)
    assert info.value.status == JobStatus.IN_PROGRESS
    result = cli(stack, "cancel", record.id)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: job {record.id} is in_progress: not cancellable")
    assert stack.emulator.counters()["cancels"] == before  # upstream was not even asked


def test_cancel_while_submitting_says_try_again(stack: Stack, client: Client) -> None:
    stack.emulator.set_faults([FaultRule(kind="slow", endpoint="submit", delay_s=1.5)])
    record = client.submit(prompt="slow submit")
    stack.wait(record.id, lambda r: r.status == JobStatus.SUBMITTING, timeout=10)
    with pytest.raises(TryAgainError, match="try again in a moment"):
        client.cancel(record.id)
    assert client.wait(record.id, timeout=30).status == JobStatus.SUCCEEDED


def test_cancel_archiving_is_not_cancellable(idle_stack: Stack, idle_client: Client) -> None:
    # No poll message exists for this job, so nothing moves it while we look.
    record = idle_client.submit(prompt="pretend it is archiving")
    store = idle_stack.producer.rt.store
    job = store.load(record.id)
    for status in (JobStatus.SUBMITTING, JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS):
        job = store.update(job, JobChange(status=status, request_id="req-x")) or job
    store.update(job, JobChange(status=JobStatus.ARCHIVING))
    with pytest.raises(NotCancellableError, match="archiving"):
        idle_client.cancel(record.id)


# ====================================================================== CLI against the worker
def test_cli_submit_wait_json_is_exactly_a_job_record(stack: Stack) -> None:
    result = cli(
        stack, "submit", "--prompt", "a red fox", "--size", "2304x1728", "--scale", "0.3",
        "--force-single", "--webhook-url", stack.receiver.url, "--metadata", "order=7",
        "--metadata", "customer=acme", "--wait", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = JobRecord.model_validate_json(result.stdout)
    assert result.stdout == record.model_dump_json() + "\n"
    assert record.status == JobStatus.SUCCEEDED
    assert record.metadata == {"order": "7", "customer": "acme"}
    assert record.request is not None and record.request.input.force_single
    progress = result.stderr.splitlines()
    assert progress[-1].startswith(record.id) and "succeeded" in progress[-1]
    assert len(progress) == len(set(progress))  # one line per change, not per read


def test_cli_submit_then_status_and_wait(stack: Stack) -> None:
    result = cli(stack, "submit", "--prompt", "a cube", "--size", "1024x1024", "--force-single")
    assert result.exit_code == 0
    job_id = result.stdout.split()[1]
    assert result.stdout == f"job {job_id} queued\n"
    waited = cli(stack, "wait", job_id, "--timeout", "30")
    assert waited.exit_code == 0, waited.output
    assert waited.stdout.startswith(f"job {job_id}: succeeded")
    assert "s3://" in waited.stdout and "sha256" in waited.stdout
    assert any("succeeded" in line for line in waited.stderr.splitlines())
    status = cli(stack, "status", job_id, "--json")
    assert JobRecord.model_validate_json(status.stdout).id == job_id
    human = cli(stack, "status", job_id)
    assert human.exit_code == 0 and "output 0  s3://" in human.stdout


def test_cli_wait_exits_1_when_the_job_fails(stack: Stack) -> None:
    stack.emulator.set_faults([FaultRule(kind="fail", endpoint="submit")])
    result = cli(stack, "submit", "--prompt", "doomed", "--wait", "--timeout", "30")
    assert result.exit_code == 1
    assert "failed" in result.stdout and "generation_failed" in result.stdout


def test_cli_wait_timeout(idle_stack: Stack, idle_client: Client) -> None:
    record = idle_client.submit(prompt="stays queued")
    result = cli(idle_stack, "wait", record.id, "--timeout", "0.5")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"error: job {record.id} still queued after 0.5s"


def test_client_is_shared_by_threads(stack: Stack, client: Client) -> None:
    results: dict[int, JobStatus] = {}
    failures: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            record = client.submit(prompt=f"thread {n}", size="1024x1024", force_single=True)
            results[n] = client.wait(record.id, timeout=30).status
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not failures
    assert results == dict.fromkeys(range(6), JobStatus.SUCCEEDED)


# ====================================================================== real subprocesses
def run_cli(
    stack: Stack | None, *args: str, redis_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(stack.env) if stack else {}
    env.setdefault("PATH", "/usr/bin:/bin")
    if redis_url:
        env["REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True, text=True, timeout=50, env=env, check=False,
    )  # fmt: skip


def test_subprocess_submit_wait_json(stack: Stack) -> None:
    proc = run_cli(stack, "submit", "--prompt", "from a shell", "--size", "1024x1024",
                   "--webhook-url", stack.receiver.url, "--wait", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = JobRecord.model_validate_json(proc.stdout)
    assert record.status == JobStatus.SUCCEEDED
    final = stack.wait_webhook(record.id)
    assert final.webhook is not None and final.webhook.state == WebhookState.DELIVERED
    assert json.loads(proc.stdout)["id"] == record.id


def test_subprocess_unreachable_redis_has_no_traceback() -> None:
    proc = run_cli(None, "status", "abc", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
