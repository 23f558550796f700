"""The command line without a running service: help, input validation (which must happen
before anything connects), progress display, summaries."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta

import click
import pytest
from click.testing import CliRunner

from api_contracts.jobs import ArchivedOutput, JobError, JobRecord, JobRequest, JobStatus
from worker.cli import ProgressPrinter, describe, main, progress_line
from worker.devtools.embedded import free_port

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
JOB = "6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c"

COMMANDS = list(main.list_commands(click.Context(main)))


def record(status: JobStatus = JobStatus.QUEUED, **changes: object) -> JobRecord:
    base = JobRecord(
        id=JOB,
        status=status,
        created_at=T0,
        updated_at=T0,
        request=JobRequest.model_validate({"input": {"prompt": "a cube"}}),
    )
    return base.model_copy(update=changes)


def run(*args: str, redis_url: str | None = None) -> click.testing.Result:
    env = {"REDIS_URL": redis_url or f"redis://127.0.0.1:{free_port()}/0"}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


# ====================================================================== help
def test_every_command_is_there() -> None:
    expected = {"submit", "status", "wait", "cancel", "demo", "worker", "emulator", "schema"}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["main", *COMMANDS])
def test_help_has_examples(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0
    if command not in (["receiver"], ["healthcheck"]):  # other modules' commands
        assert "Examples:" in result.stdout


def test_submit_help_lists_every_option_and_the_sizes() -> None:
    text = run("submit", "--help").stdout
    for option in (
        "--prompt", "--size", "--scale", "--force-single", "--webhook-url",
        "--idempotency-key", "--metadata", "--wait", "--json", "--redis-url",
    ):  # fmt: skip
        assert option in text
    assert "6198x2656" in text and "4096x4096" in text


# ====================================================================== bad input: exit 2, offline
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--prompt", "x", "--size", "9x9"], "error: input.size: '9x9' is not an allowed size; "
         "allowed: 1024x1024(1:1), 2048x2048(1:1), 2304x1728(4:3), 2496x1664(3:2), "
         "2560x1440(16:9), 3024x1296(21:9), 4096x4096(1:1), 4694x3520(4:3), 4992x3328(3:2), "
         "5404x3040(16:9), 6198x2656(21:9)"),
        ([], "error: input.prompt: Field required"),
        (["--prompt", "   "],
         "error: input.prompt: prompt must contain something other than whitespace"),
        (["--prompt", "x" * 801],
         "error: input.prompt: String should have at most 800 characters"),
        (["--prompt", "x", "--scale", "-1"],
         "error: input.scale: Input should be greater than or equal to 0"),
        (["--prompt", "x", "--scale", "nan"],
         "error: input.scale: scale must be a finite number between 0 and 1"),
        (["--prompt", "x", "--metadata", "=v"], "error: metadata: '=v' is not KEY=VALUE"),
        (["--prompt", "x", "--webhook-url", "http://user:pw@example.com/"],
         "error: webhook_url: webhook_url must not carry credentials"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_before_connecting(args: list[str], line: str) -> None:
    # REDIS_URL points at nothing: reaching Redis would exit 1, so exit 2 proves it never tried.
    result = run("submit", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == line + "\n"
    assert result.stdout == ""


def test_private_webhook_refused_unless_allowed() -> None:
    result = run("submit", "--prompt", "x", "--webhook-url", "http://127.0.0.1:9/hook")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: webhook_url: ")


def test_bad_configuration_exits_2() -> None:
    result = CliRunner(env={"REDIS_URL": "http://not-redis"}).invoke(main, ["status", JOB])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid configuration: REDIS_URL: ")


def test_unreachable_redis_exits_1_with_one_line() -> None:
    result = run("status", JOB)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_schema_check_passes() -> None:
    result = run("schema", "--check")
    assert result.exit_code == 0 and "up to date" in result.stdout


# ====================================================================== progress and summaries
def test_progress_line_shows_state_position_elapsed() -> None:
    line = progress_line(
        record(JobStatus.IN_QUEUE, queue_position=3), now=T0 + timedelta(seconds=12.34)
    )
    assert line == f"{JOB}  in_queue     queue position 3    12.3s"
    done = record(JobStatus.SUCCEEDED, finished_at=T0 + timedelta(seconds=4))
    assert progress_line(done, now=T0 + timedelta(hours=1)).endswith("succeeded       4.0s")


def test_progress_on_a_pipe_is_one_line_per_change() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=False)
    for r in (
        record(),
        record(),  # a re-read without change prints nothing
        record(JobStatus.IN_QUEUE, queue_position=2),
        record(JobStatus.IN_QUEUE, queue_position=1),
        record(JobStatus.IN_QUEUE, queue_position=1),
        record(JobStatus.SUCCEEDED, finished_at=T0),
    ):
        printer.show(r)
    printer.finish()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["queued", "in_queue", "in_queue", "succeeded"]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True)
    printer.show(record())
    printer.show(record())
    printer.show(record(JobStatus.SUCCEEDED, finished_at=T0))
    printer.finish()
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.count("\n") == 1 and text.endswith("\n")


def test_describe_a_finished_job() -> None:
    out = ArchivedOutput(
        kind="image", index=0, source_url="https://x/0.png", s3_uri="s3://b/p/j/0.png",
        bucket="b", key="p/j/0.png", bytes=123, sha256="a" * 64, content_type="image/png",
    )  # fmt: skip
    text = "\n".join(
        describe(
            record(
                JobStatus.FAILED,
                finished_at=T0 + timedelta(seconds=2),
                outputs=[out],
                error=JobError(code="generation_failed", message="boom"),
            )
        )
    )
    assert text.startswith(f"job {JOB}: failed (2.0s since created)")
    assert f"output 0  s3://b/p/j/0.png  123 bytes  sha256 {'a' * 64}" in text
    assert "error     generation_failed: boom" in text
    assert "2048x2048(1:1) scale 0.5  'a cube'" in text


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ({"WEBHOOK_SECRET": ""}, ["WEBHOOK_SECRET"]),
        ({"RUNCOMFY_API_TOKEN": ""}, ["RUNCOMFY_API_TOKEN"]),
        (
            {"WEBHOOK_SECRET": "", "RUNCOMFY_API_TOKEN": ""},
            ["WEBHOOK_SECRET", "RUNCOMFY_API_TOKEN"],
        ),
    ],
)
def test_a_worker_refuses_to_start_without_what_it_needs(
    unset: dict[str, str], named: list[str]
) -> None:
    import subprocess
    import sys

    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "RUNCOMFY_API_TOKEN": "tok",
        "WEBHOOK_SECRET": "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
        **unset,
    }
    for argv in (
        [sys.executable, "-m", "worker", "worker"],
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker"],
    ):
        done = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (argv, done.stderr[-2000:])
        for name in named:
            assert name in done.stderr
