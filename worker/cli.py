"""``runcomfy-worker``: the service's command line."""

from __future__ import annotations

import sys

import click

from worker import __version__

EPILOG = """\b
Examples:
  runcomfy-worker worker                 # run a worker on all four queues
  runcomfy-worker worker -Q runcomfy.poll -c 32
  runcomfy-worker emulator --port 8188   # local RunComfy stand-in, no token needed
  runcomfy-worker schema --check         # verify committed JSON Schemas
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runcomfy-worker")
def main() -> None:
    """Celery workers that turn image requests into archived outputs and signed webhooks."""


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
    from worker.run import run_worker

    sys.exit(run_worker(list(ctx.args)))


def _register_optional() -> None:
    """Attach commands that live in their own modules."""
    from worker.emulator.cli import emulator_command
    from worker.health import healthcheck_command
    from worker.receiver import receiver_command

    main.add_command(emulator_command, "emulator")
    main.add_command(receiver_command, "receiver")
    main.add_command(healthcheck_command, "healthcheck")


_register_optional()
