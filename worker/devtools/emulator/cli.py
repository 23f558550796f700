"""``runcomfy-worker emulator``: run the RunComfy emulator in the foreground."""

from __future__ import annotations

import logging

import click
from pydantic import ValidationError

from worker.devtools.emulator.config import EmulatorConfig
from worker.devtools.emulator.faults import FAULT_KINDS
from worker.devtools.emulator.server import serve_forever

_DEFAULTS = EmulatorConfig()

_EPILOG = f"""\b
Examples:
  runcomfy-worker emulator
  runcomfy-worker emulator --port 9000 --token secret --queue-s 0.2 --run-s 1
  runcomfy-worker emulator --fault-rate 429=0.05 --fault-rate 503@status=0.02 --seed 7

\b
Point the worker at it:
  RUNCOMFY_BASE_URL=http://127.0.0.1:8188 RUNCOMFY_API_TOKEN=secret

\b
Fault kinds for --fault-rate KIND[@ENDPOINT]=P (endpoint: submit, status,
result, cancel, download; default any):
  {", ".join(sorted(FAULT_KINDS))}

\b
Admin endpoints (no auth): GET /_emulator/counters, POST /_emulator/reset,
GET|POST /_emulator/faults, GET|POST /_emulator/config, GET /_emulator/requests
"""


def _parse_rates(values: tuple[str, ...]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for value in values:
        key, sep, probability = value.partition("=")
        try:
            if not sep:
                raise ValueError
            rates[key.strip()] = float(probability)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected KIND=P, e.g. 429=0.05") from None
    return rates


@click.command(name="emulator", epilog=_EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8188, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    default=None,
    envvar="RUNCOMFY_EMULATOR_TOKEN",
    help="The only Bearer token accepted (default: any non-empty token).",
)
@click.option(
    "--queue-s", type=click.FloatRange(min=0), default=_DEFAULTS.queue_s, show_default=True
)
@click.option("--run-s", type=click.FloatRange(min=0), default=_DEFAULTS.run_s, show_default=True)
@click.option(
    "--capacity",
    type=click.IntRange(min=1),
    default=_DEFAULTS.capacity,
    show_default=True,
    help="Requests in progress at once; the rest wait in queue order.",
)
@click.option(
    "--images-per-set",
    type=click.IntRange(1, 4),
    default=_DEFAULTS.images_per_set,
    show_default=True,
    help="Images per result when force_single is false.",
)
@click.option("--video/--no-video", default=False, show_default=True, help="Add fake MP4 outputs.")
@click.option(
    "--output-min-bytes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Pad every output file to at least this size.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fault rates.")
@click.option(
    "--fault-rate",
    "fault_rates",
    multiple=True,
    metavar="KIND=P",
    help="Probability of a fault per call (repeatable), e.g. 500=0.1 or slow@result=0.05.",
)
@click.option(
    "--public-base-url",
    default=None,
    metavar="URL",
    help="Base of the URLs it hands out (e.g. http://emulator:8188 inside docker compose); "
    "default: the address it listens on.",
)
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def emulator_command(
    *,
    host: str,
    port: int,
    token: str | None,
    queue_s: float,
    run_s: float,
    capacity: int,
    images_per_set: int,
    video: bool,
    output_min_bytes: int,
    seed: int,
    fault_rates: tuple[str, ...],
    public_base_url: str | None,
    log_level: str,
) -> None:
    """Run a local RunComfy Model API emulator (no real token needed)."""
    try:
        config = EmulatorConfig(
            token=token or None,
            queue_s=queue_s,
            run_s=run_s,
            capacity=capacity,
            images_per_set=images_per_set,
            video=video,
            output_min_bytes=output_min_bytes,
            seed=seed,
            fault_rates=_parse_rates(fault_rates),
            public_base_url=public_base_url,
        )
    except ValidationError as exc:
        raise click.UsageError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    else:
        logging.getLogger("worker.devtools.emulator").setLevel(log_level.upper())
    serve_forever(config, host, port)
