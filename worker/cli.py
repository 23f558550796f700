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
    from worker.jobs.reconcile import Reconciler
    from worker.producer.client import Client
    from worker.queueing.dead_letters import DeadLetterStore

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
    elif record.wait is not None and record.status.value == "queued":
        what = "a RunComfy slot" if record.wait.reason == "slot" else "the account (paused)"
        ahead = f", {record.wait.position} ahead" if record.wait.position is not None else ""
        parts.append(f"waiting for {what}{ahead}")
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
@click.option(
    "--tenant", default=None, metavar="NAME", help="Who the job is for (fair shares of RunComfy)."
)
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "low"]),
    default=None,
    help="When jobs wait for a RunComfy slot. [default: normal]",
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
    tenant: str | None,
    priority: str | None,
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
                tenant=tenant,
                priority=priority,
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


@contextmanager
def _operator(redis_url: str | None) -> Iterator[Reconciler]:
    """What an operator command works with: a reconciler over this environment's store,
    publishing through a Celery app with no tasks; Redis errors become ``error: …``."""
    import redis as redis_lib
    from celery import Celery

    from worker.queueing.config import celery_config
    from worker.queueing.publish import make_publisher
    from worker.queueing.run import make_reconciler
    from worker.runtime import Runtime
    from worker.settings import load_settings

    with reported_errors():
        settings = load_settings(redis={"url": redis_url}) if redis_url else load_settings()
    app = Celery("runcomfy_operator", set_as_current=False)
    app.conf.update(celery_config(settings))
    rt = Runtime(settings)
    try:
        yield make_reconciler(rt, make_publisher(app))
    except redis_lib.RedisError as exc:
        _fail(f"cannot reach Redis: {exc}")
    finally:
        rt.close()
        app.close()


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker reconcile --dry-run        # what is stuck, since when, and why
  runcomfy-worker reconcile --json | jq .
  runcomfy-worker reconcile                  # move every overdue job on now

\b
Workers run a pass every RECONCILE_INTERVAL_S on their own; this runs one now. Exit 0
also when nothing was overdue.""",
)
@click.option("--dry-run", is_flag=True, help="Only list the overdue jobs and the planned action.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--limit", default=None, type=click.IntRange(1), help="At most this many jobs.")
@_redis_url_option
def reconcile(dry_run: bool, as_json: bool, limit: int | None, redis_url: str | None) -> None:
    """List the jobs whose next step is overdue and (unless --dry-run) move them on."""
    import json

    with _operator(redis_url) as reconciler:
        if limit is not None:
            reconciler.batch = limit
        done = reconciler.run_pass(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps([item.as_dict() for item in done], indent=2))
        return
    verb = "would" if dry_run else "did"
    for item in done:
        fields = item.as_dict()
        click.echo(
            f"{item.job_id}  {fields['status'] or '-':<11} overdue since {fields['overdue_since']}"
            f"  {verb} {fields['action']}: {fields['reason']}"
        )
    click.echo(f"{len(done)} overdue job(s)", err=True)


@main.command(
    epilog="""\b
Examples:
  runcomfy-worker resume          # after topping up the balance or fixing the token

\b
An account error from RunComfy (401/403, 400002 insufficient balance, 400004, 403001)
pauses submissions fleet-wide: jobs stay queued, `runcomfy-worker healthcheck --ready` says
why, and one job tries again every RUNCOMFY_ACCOUNT_PROBE_S. This closes the circuit now.""",
)
@_redis_url_option
def resume(redis_url: str | None) -> None:
    """Resume submissions paused by an account error, at once."""
    with _operator(redis_url) as reconciler:
        admission = reconciler.handoff.admission
        pause = admission.paused()
        admission.resume()
        admitted = reconciler.handoff.admit_waiting()
    if pause is None:
        click.echo("submissions were not paused")
    else:
        click.echo(f"resumed (paused by {pause.code}: {pause.message}); {len(admitted)} admitted")


# ====================================================================== dead letters
@main.group(
    "dead-letters",
    epilog="""\b
Examples:
  runcomfy-worker dead-letters list                  # newest first, 20 at most
  runcomfy-worker dead-letters list --json --limit 100 | jq -r '.[].reason'
  runcomfy-worker dead-letters show 0                # by index (0 = newest) or by id
  runcomfy-worker dead-letters requeue 3f9c0d2e8a4b4f0e9d8c7b6a5f4e3d2c  # after fixing the cause
  runcomfy-worker dead-letters requeue --all
  runcomfy-worker dead-letters purge --yes

\b
Broker messages the worker could not turn into a runnable task (not JSON, headers or body
Celery cannot use, unknown task name) are kept in the Redis list rcw:dead (newest first,
capped) with the reason, the time, the queue and the raw message, and acknowledged.
""",
)
def dead_letters_group() -> None:
    """Inspect, requeue or purge messages the worker could not run (dead letters)."""


@contextmanager
def _dead_letter_store(redis_url: str | None) -> Iterator[DeadLetterStore]:
    """A DeadLetterStore on REDIS_URL; Redis errors become ``error: …`` and exit 1."""
    import redis as redis_lib

    from worker.errors import ConfigError, DeadLetterNotFoundError, NotRequeueableError
    from worker.queueing.dead_letters import DeadLetterStore
    from worker.services.redis_client import make_redis
    from worker.settings import load_settings

    try:
        settings = load_settings(redis={"url": redis_url}) if redis_url else load_settings()
    except ConfigError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    client = make_redis(settings.redis)
    try:
        yield DeadLetterStore(client)
    except (DeadLetterNotFoundError, NotRequeueableError) as exc:
        _fail(str(exc))
    except redis_lib.RedisError as exc:
        _fail(f"cannot use Redis: {exc}")
    finally:
        client.close()


def _dead_letter_ref(ref: str) -> str:
    """An index (digits) or an entry id (32 hex digits); anything else exits 2."""
    import re

    if not re.fullmatch(r"\d{1,9}|[0-9a-f]{32}", ref):
        _fail(f"{ref!r} is neither an index (0 = newest) nor a dead-letter id", EXIT_BAD_INPUT)
    return ref


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@dead_letters_group.command(
    "list",
    epilog="""\b
Examples:
  runcomfy-worker dead-letters list
  runcomfy-worker dead-letters list --limit 200 --json > dead.json
""",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True,
    help="Show at most this many (newest first).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of whole entries.")
@_redis_url_option
def dead_letters_list(limit: int, as_json: bool, redis_url: str | None) -> None:
    """List dead letters, newest first: index, time, reason, queue, id, detail."""
    import json

    with _dead_letter_store(redis_url) as store:
        total = store.count()
        entries = store.entries(limit=limit)
    if as_json:
        click.echo(json.dumps([{"index": i, **e.to_dict()} for i, e in entries], indent=2))
        return
    if not entries:
        click.echo("no dead letters")
        return
    for index, entry in entries:
        click.echo(
            f"{index:>4}  {entry.at}  {entry.reason:<20}  {entry.queue or '?':<16}  "
            f"{entry.id}  {_one_line(entry.detail, 80)}"
        )
    if total > len(entries):
        click.echo(f"({len(entries)} of {total} shown; --limit for more)")


@dead_letters_group.command(
    "show",
    epilog="""\b
Examples:
  runcomfy-worker dead-letters show 0
  runcomfy-worker dead-letters show 3f9c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --json | jq -r .raw
""",
)
@click.argument("ref", metavar="INDEX|ID")
@click.option("--json", "as_json", is_flag=True, help="Print the whole entry as JSON.")
@_redis_url_option
def dead_letters_show(ref: str, as_json: bool, redis_url: str | None) -> None:
    """Show one dead letter: why, when, from which queue, and the raw message."""
    import json

    with _dead_letter_store(redis_url) as store:
        index, entry = store.get(_dead_letter_ref(ref))
    if as_json:
        click.echo(json.dumps({"index": index, **entry.to_dict()}, indent=2))
        return
    size = f"{entry.raw_bytes} bytes" + (
        ", truncated: cannot be requeued" if entry.truncated else ""
    )
    click.echo(f"dead letter {entry.id} (index {index})")
    click.echo(f"  at      {entry.at}")
    click.echo(f"  reason  {entry.reason}")
    click.echo(f"  detail  {entry.detail or '-'}")
    click.echo(f"  queue   {entry.queue or '?'}")
    click.echo(f"  raw     {size}")
    click.echo(_describe_raw(entry.raw))


def _describe_raw(raw: str) -> str:
    """The raw message, pretty-printed when it is JSON, with a base64 body decoded."""
    import base64
    import binascii
    import json

    try:
        envelope = json.loads(raw)
    except ValueError:
        return raw
    lines = [json.dumps(envelope, indent=2, ensure_ascii=False)]
    body = envelope.get("body") if isinstance(envelope, dict) else None
    if isinstance(body, str):
        try:
            decoded = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = None
        if decoded is not None:
            lines.append(f"body (base64-decoded): {decoded}")
    return "\n".join(lines)


@dead_letters_group.command(
    "requeue",
    epilog="""\b
Examples:
  runcomfy-worker dead-letters requeue 0
  runcomfy-worker dead-letters requeue --all

\b
Pushes the raw message back onto the queue it came from (at the back of the line) and
removes the entry. Fix the cause first (producer, deploy of a missing task …): a message
that still cannot run comes straight back. Truncated entries cannot be requeued.
Exit 1 when the entry is gone or cannot be requeued (with --all: when any was skipped).
""",
)
@click.argument("ref", metavar="INDEX|ID", required=False)
@click.option("--all", "all_", is_flag=True, help="Requeue every entry there is now.")
@_redis_url_option
def dead_letters_requeue(ref: str | None, all_: bool, redis_url: str | None) -> None:
    """Push dead letters back onto their queues (one by INDEX|ID, or --all)."""
    if (ref is None) == (not all_):
        _fail("give either INDEX|ID or --all", EXIT_BAD_INPUT)
    if ref is not None:
        with _dead_letter_store(redis_url) as store:
            entry = store.requeue(_dead_letter_ref(ref))
        click.echo(f"requeued {entry.id} onto {entry.queue}")
        return
    with _dead_letter_store(redis_url) as store:
        report = store.requeue_all()
    click.echo(f"requeued {len(report.requeued)} dead letter(s)")
    if report.skipped:
        ids = ", ".join(e.id or "?" for e in report.skipped)
        _fail(f"{len(report.skipped)} cannot be requeued (truncated or no queue): {ids}")


@dead_letters_group.command(
    "purge",
    epilog="""\b
Examples:
  runcomfy-worker dead-letters purge           # asks first (on a terminal)
  runcomfy-worker dead-letters purge --yes
""",
)
@click.option("--yes", is_flag=True, help="Do not ask (required when not on a terminal).")
@_redis_url_option
def dead_letters_purge(yes: bool, redis_url: str | None) -> None:
    """Delete every dead letter."""
    with _dead_letter_store(redis_url) as store:
        count = store.count()
        if count and not yes:
            if not sys.stdin.isatty():
                _fail(f"refusing to delete {count} dead letter(s) without --yes", EXIT_BAD_INPUT)
            if not click.confirm(f"delete {count} dead letter(s)?"):
                _fail("nothing deleted")
        deleted = store.purge() if count else 0
    click.echo(f"deleted {deleted} dead letter(s)")


def _register_optional() -> None:
    """Attach commands that live in their own modules."""
    from worker.devtools.emulator.cli import emulator_command
    from worker.devtools.receiver import receiver_command
    from worker.health import healthcheck_command

    main.add_command(emulator_command, "emulator")
    main.add_command(receiver_command, "receiver")
    main.add_command(healthcheck_command, "healthcheck")


_register_optional()
