"""``runcomfy-worker``: the service's command line.

Producer commands (``submit``, ``status``, ``wait``, ``cancel``) talk to Redis through
:class:`worker.producer.client.Client`; ``worker`` runs a Celery worker; ``demo`` runs the whole
pipeline on embedded stand-ins. Exit codes: 0 done, 1 failed / not possible right now,
2 bad input or configuration (nothing was queued).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

import click

from api_contracts.inputs import SIZES
from worker import __version__

if TYPE_CHECKING:
    from api_contracts.jobs import JobRecord
    from worker.producer.client import Client

EPILOG = """\b
Examples:
  runcomfy-worker demo                   # the whole pipeline on embedded services, < 1 min
  runcomfy-worker submit --prompt "a lighthouse at dusk" --size 2048x2048 --wait
  runcomfy-worker status 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --json
  runcomfy-worker wait 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c
  runcomfy-worker cancel 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c
  runcomfy-worker worker                 # run a worker on all four queues
  runcomfy-worker worker -Q runcomfy.poll -c 32
  runcomfy-worker emulator --port 8188   # local RunComfy stand-in, no token needed
  runcomfy-worker schema --check         # verify committed JSON Schemas

\b
Settings come from the environment (REDIS_URL, RUNCOMFY_*, S3_*, WEBHOOK_* …; see README).
Exit codes: 0 done, 1 failed or not possible now, 2 bad input or configuration.
"""

#: Exit code for bad input or configuration (nothing was queued), as click uses for usage.
EXIT_BAD_INPUT: Final = 2
#: Exit code for everything else that went wrong.
EXIT_FAILED: Final = 1


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runcomfy-worker")
def main() -> None:
    """Celery workers that turn image requests into archived outputs and signed webhooks."""


# ====================================================================== shared helpers
def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the service's expected errors into one ``error: …`` line and an exit code."""
    from worker.errors import ConfigError, JobNotFoundError, NotCancellableError
    from worker.producer.client import (
        IdempotencyConflictError,
        InvalidRequestError,
        RedisUnavailableError,
        TryAgainError,
        WaitTimeoutError,
    )

    try:
        yield
    except InvalidRequestError as exc:
        for field, reason in exc.errors:
            click.echo(f"error: {field}: {reason}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except IdempotencyConflictError as exc:
        _fail(f"idempotency_key: {exc}", EXIT_BAD_INPUT)
    except ConfigError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except (
        JobNotFoundError,
        RedisUnavailableError,
        NotCancellableError,
        TryAgainError,
        WaitTimeoutError,
    ) as exc:
        _fail(str(exc))


def _client(redis_url: str | None) -> Client:
    from worker.producer.client import Client

    return Client(redis_url=redis_url)


_F = TypeVar("_F", bound=Callable[..., Any])


def _redis_url_option(func: _F) -> _F:
    return click.option(
        "--redis-url",
        envvar="REDIS_URL",
        default=None,
        metavar="URL",
        help="Broker and job store. [default: $REDIS_URL, else redis://localhost:6379/0]",
    )(func)


def _elapsed(record: JobRecord, now: datetime | None = None) -> float:
    end = record.finished_at if record.status.is_terminal and record.finished_at else None
    return ((end or now or datetime.now(UTC)) - record.created_at).total_seconds()


def progress_line(record: JobRecord, now: datetime | None = None) -> str:
    """``<id>  <state>  [queue position N]  <elapsed>s``: one job's progress on one line."""
    parts = [record.id, f"{record.status.value:<11}"]
    if record.queue_position is not None:
        parts.append(f"queue position {record.queue_position}")
    parts.append(f"{_elapsed(record, now):6.1f}s")
    return "  ".join(parts)


class ProgressPrinter:
    """Shows a job's progress: on a terminal one line rewritten in place, elsewhere one line
    per change of state or queue position."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._last: tuple[object, ...] | None = None
        self._open_line = False

    def show(self, record: JobRecord) -> None:
        """Print (or rewrite) the progress line for ``record``."""
        line = progress_line(record)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._open_line = True
        else:
            key = (record.status, record.queue_position)
            if key == self._last:
                return
            self._last = key
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the rewritten line, if any."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def describe(record: JobRecord) -> list[str]:
    """A human summary of a record, a few lines."""
    lines = [f"job {record.id}: {record.status.value} ({_elapsed(record):.1f}s since created)"]
    if record.request is not None:
        gen = record.request.input
        prompt = gen.prompt if len(gen.prompt) <= 60 else gen.prompt[:57] + "..."
        lines.append(
            f"  request   {gen.size} scale {gen.scale:g}"
            f"{' force_single' if gen.force_single else ''}  {prompt!r}"
        )
        if record.request.metadata:
            pairs = " ".join(f"{k}={v}" for k, v in sorted(record.request.metadata.items()))
            lines.append(f"  metadata  {pairs}")
    if record.request_id:
        lines.append(
            f"  upstream  request {record.request_id}, {record.status_calls} status call(s)"
        )
    if record.queue_position is not None:
        lines.append(f"  queue     position {record.queue_position}")
    for out in record.outputs:
        lines.append(f"  output {out.index}  {out.s3_uri}  {out.bytes} bytes  sha256 {out.sha256}")
    if record.error is not None:
        lines.append(f"  error     {record.error.code}: {record.error.message}")
    if record.webhook is not None:
        hook = record.webhook
        lines.append(
            f"  webhook   {hook.state.value} ({len(hook.deliveries)} attempt(s), id {hook.id})"
        )
    lines.extend(f"  note      {note}" for note in record.notes)
    return lines


def _echo_record(record: JobRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json())
    else:
        click.echo("\n".join(describe(record)))


def _follow(client: Client, job_id: str, timeout: float | None) -> JobRecord:
    """Wait for the job, showing progress on stderr; returns the final record."""
    printer = ProgressPrinter(sys.stderr)
    record = None
    try:
        with closing(client.watch(job_id, timeout=timeout)) as updates:
            for record in updates:
                printer.show(record)
    finally:
        printer.finish()
    assert record is not None
    return record


def _final_exit(record: JobRecord) -> None:
    from api_contracts.jobs import JobStatus

    if record.status != JobStatus.SUCCEEDED:
        raise SystemExit(EXIT_FAILED)


# ====================================================================== producer commands
_SIZES_HELP = ", ".join(size.split("(", 1)[0] for size in SIZES)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker submit --prompt "a lighthouse at dusk"
  runcomfy-worker submit --prompt "a red fox" --size 6198x2656 --scale 0.7 --force-single
  runcomfy-worker submit --prompt "four cats" --webhook-url https://example.com/hooks \\
      --idempotency-key order-42 --metadata order=42 --metadata customer=acme --wait
  runcomfy-worker submit --prompt "a cube" --json | jq -r .id

\b
Prints the job id and state (or, with --json, the JobRecord as JSON). With --wait it
follows the job and exits 0 only if it succeeded. Bad input exits 2 naming the field;
nothing is queued then.
"""
)
@click.option("--prompt", default=None, help="What to draw (1 to 800 characters).")
@click.option(
    "--size",
    default=None,
    metavar="WxH",
    help=f"Output size; one of {_SIZES_HELP}. [default: 2048x2048]",
)
@click.option(
    "--scale", default=None, metavar="0..1", help="How strongly the prompt steers. [default: 0.5]"
)
@click.option("--force-single", is_flag=True, help="Ask for exactly one image (else a set).")
@click.option("--webhook-url", default=None, metavar="URL", help="Where to POST the signed result.")
@click.option(
    "--idempotency-key", default=None, metavar="KEY", help="Same key + same request = same job."
)
@click.option(
    "--metadata",
    multiple=True,
    metavar="KEY=VALUE",
    help="Echoed in the record and webhook (repeatable).",
)
@click.option("--wait", "wait_", is_flag=True, help="Follow the job until it is final.")
@click.option(
    "--timeout", type=float, default=None, metavar="SECONDS", help="With --wait: give up then."
)
@click.option("--json", "as_json", is_flag=True, help="Print the JobRecord as JSON.")
@_redis_url_option
def submit(
    *,
    prompt: str | None,
    size: str | None,
    scale: str | None,
    force_single: bool,
    webhook_url: str | None,
    idempotency_key: str | None,
    metadata: tuple[str, ...],
    wait_: bool,
    timeout: float | None,
    as_json: bool,
    redis_url: str | None,
) -> None:
    """Queue one text-to-image job (validated first: bad input exits 2, nothing queued)."""
    from worker.producer.client import InvalidRequestError

    with reported_errors():
        problems: list[tuple[str, str]] = []
        pairs: dict[str, str] = {}
        for item in metadata:
            key, sep, value = item.partition("=")
            if not sep or not key:
                problems.append(("metadata", f"{item!r} is not KEY=VALUE"))
            pairs[key] = value
        scale_value: float | None = None
        if scale is not None:
            try:
                scale_value = float(scale)
            except ValueError:
                problems.append(("input.scale", f"{scale!r} is not a number between 0 and 1"))
        if problems:
            raise InvalidRequestError(problems)
        with _client(redis_url) as client:
            record = client.submit(
                prompt=prompt,
                size=size,
                scale=scale_value,
                force_single=force_single,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
                metadata=pairs or None,
            )
            if not as_json:
                click.echo(f"job {record.id} {record.status.value}")
            if wait_:
                record = _follow(client, record.id, timeout)
                _echo_record(record, as_json)
                _final_exit(record)
            elif as_json:
                _echo_record(record, as_json)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker status 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c
  runcomfy-worker status 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --json | jq .outputs

\b
Unknown (or expired) jobs exit 1.
"""
)
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the JobRecord as JSON.")
@_redis_url_option
def status(job_id: str, as_json: bool, redis_url: str | None) -> None:
    """Show a job: state, outputs in S3, error, webhook deliveries."""
    with reported_errors(), _client(redis_url) as client:
        _echo_record(client.get(job_id), as_json)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker wait 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c
  runcomfy-worker wait 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --timeout 600 --json

\b
Progress (state, queue position, elapsed) goes to stderr: on a terminal one line is
rewritten, otherwise one line per change. Exit 0 when the job succeeded, 1 when it
failed, was cancelled, is unknown or the timeout passed.
"""
)
@click.argument("job_id")
@click.option(
    "--timeout", type=float, default=None, metavar="SECONDS", help="Give up then. [default: never]"
)
@click.option("--json", "as_json", is_flag=True, help="Print the final JobRecord as JSON.")
@_redis_url_option
def wait(job_id: str, timeout: float | None, as_json: bool, redis_url: str | None) -> None:
    """Follow a job until it is final, then show it."""
    with reported_errors(), _client(redis_url) as client:
        record = _follow(client, job_id, timeout)
        _echo_record(record, as_json)
        _final_exit(record)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker cancel 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c
  runcomfy-worker cancel 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --timeout 60 --json

\b
queued       cancelled at once; never reaches RunComfy; job.cancelled webhook sent
in_queue     a worker cancels it in RunComfy's queue; waits up to --timeout
submitting   exit 1: being submitted right now, try again in a moment
in_progress  exit 1: not cancellable (RunComfy cannot cancel running work)
archiving    exit 1: not cancellable
final        nothing to do; exit 0 if it is cancelled, else 1
"""
)
@click.argument("job_id")
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
    help="How long to wait for a job in RunComfy's queue to be cancelled.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the JobRecord as JSON.")
@_redis_url_option
def cancel(job_id: str, timeout: float, as_json: bool, redis_url: str | None) -> None:
    """Cancel a job that has not started running upstream."""
    from api_contracts.jobs import JobStatus

    with reported_errors(), _client(redis_url) as client:
        before = client.get(job_id).status
        record = client.cancel(job_id, timeout=timeout)
        if as_json:
            click.echo(record.model_dump_json())
        elif before.is_terminal:
            click.echo(f"job {job_id} is already {record.status.value}; nothing to cancel")
        else:
            click.echo(f"job {job_id} {record.status.value} (was {before.value})")
        if record.status != JobStatus.CANCELLED:
            raise SystemExit(EXIT_FAILED)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker demo                       # everything embedded, output in ./demo-output
  REDIS_URL=redis://localhost:6379/0 runcomfy-worker demo      # a real Redis
  S3_ENDPOINT_URL=http://localhost:9000 S3_BUCKET=demo runcomfy-worker demo
  RUNCOMFY_API_TOKEN=… runcomfy-worker demo  # the real RunComfy (costs money)

\b
Starts what is not configured: Redis (unless REDIS_URL), an S3 endpoint (unless
S3_ENDPOINT_URL or S3_BUCKET), the RunComfy emulator (unless RUNCOMFY_API_TOKEN or
RUNCOMFY_BASE_URL), always a signature-verifying webhook receiver and one worker.
Submits a handful of jobs, shows their progress, checks every output and webhook,
copies the images into --output-dir and stops everything it started. Exit 1 if
anything failed.
"""
)
@click.option(
    "--output-dir", default="demo-output", show_default=True,
    type=click.Path(file_okay=False), help="Where the archived images are copied.",
)  # fmt: skip
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, metavar="SECONDS",
    help="Give up on the jobs then.",
)  # fmt: skip
def demo(output_dir: str, timeout: float) -> None:
    """Run the whole pipeline end to end on embedded Redis, S3 and RunComfy emulator."""
    from worker.devtools.demo import run_demo

    sys.exit(run_demo(output_dir=output_dir, timeout_s=timeout))


# ====================================================================== service commands
@main.command(
    epilog="""\b
Examples:
  runcomfy-worker schema            # print the schemas as JSON
  runcomfy-worker schema --write    # rewrite api_contracts/schemas/*.json
  runcomfy-worker schema --check    # exit 1 if the committed files differ
"""
)
@click.option("--write", is_flag=True, help="Rewrite api_contracts/schemas/*.json.")
@click.option("--check", is_flag=True, help="Exit 1 when the committed files are out of date.")
def schema(write: bool, check: bool) -> None:
    """Print, write or check the JSON Schemas of JobRequest, JobRecord and WebhookEvent."""
    from api_contracts.schema import SCHEMA_DIR, render, schemas, write_schemas

    if write:
        for path in write_schemas():
            click.echo(f"wrote {path}")
        return
    if check:
        stale = [
            name
            for name, sch in schemas().items()
            if not (SCHEMA_DIR / f"{name}.schema.json").exists()
            or (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8") != render(sch)
        ]
        if stale:
            click.echo(
                f"out of date: {', '.join(stale)} (run: runcomfy-worker schema --write)", err=True
            )
            sys.exit(1)
        click.echo("schemas up to date")
        return
    import json

    click.echo(json.dumps(schemas(), indent=2, ensure_ascii=False))


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="""\b
Examples:
  runcomfy-worker worker                          # all queues, threads pool
  runcomfy-worker worker -Q runcomfy.poll -c 32   # a poll-only worker
  runcomfy-worker worker -P prefork -c 2 -Q runcomfy.archive
Any other argument is passed to `celery worker`.""",
)
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (all queues by default; -Q to pick). Reads settings from the env."""
    from worker.queueing.run import run_worker

    sys.exit(run_worker(list(ctx.args)))


def _register_optional() -> None:
    """Attach commands that live in their own modules."""
    from worker.devtools.emulator.cli import emulator_command
    from worker.devtools.receiver import receiver_command
    from worker.health import healthcheck_command

    main.add_command(emulator_command, "emulator")
    main.add_command(receiver_command, "receiver")
    main.add_command(healthcheck_command, "healthcheck")


_register_optional()
