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
  runcomfy-worker emulator --max-concurrent 8 --max-submits-per-s 2 --balance 100

\b
Point the worker at it:
  RUNCOMFY_BASE_URL=http://127.0.0.1:8188 RUNCOMFY_API_TOKEN=secret

\b
Fault kinds for --fault-rate KIND[@ENDPOINT]=P (endpoint: submit, status,
result, cancel, download; default any):
  {", ".join(sorted(FAULT_KINDS))}

\b
Account protection (all off by default; limits are per Bearer token):
  --max-concurrent N      429 + Retry-After (--retry-after-s) on a submit
                          while N requests are in_queue/in_progress
  --max-submits-per-s R   token bucket of --submit-burst (default max(1, R));
                          429 + Retry-After = seconds until allowed
  --balance B             each accepted submit costs --cost-per-request;
                          too little: HTTP 400 (200 with
                          --account-errors-as-200) {{"error_code": 400002, ...}}
  --request-ttl-s T       T s after a request ends, status/result/cancel
                          answer 404 {{"error_code": 404001, ...}}

\b
Admin endpoints (no auth): GET /_emulator/counters, POST /_emulator/reset,
GET|POST /_emulator/faults, GET|POST /_emulator/config, GET /_emulator/requests,
GET|POST /_emulator/balance ({{"add": N}} or {{"set": N}})
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
@click.option(
    "--queue-extra-s",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.queue_extra_s,
    show_default=True,
    help="Mean of an exponential wait added to each request's --queue-s (shared upstream queue).",
)
@click.option("--run-s", type=click.FloatRange(min=0), default=_DEFAULTS.run_s, show_default=True)
@click.option(
    "--run-sigma",
    type=click.FloatRange(min=0, max=3),
    default=_DEFAULTS.run_sigma,
    show_default=True,
    help="Lognormal spread of run times around --run-s (its median); 0: all exactly --run-s.",
)
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
@click.option(
    "--retry-after-s",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.retry_after_s,
    show_default=True,
    help="Retry-After of 429 faults and of concurrency-limit 429s.",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Requests one token may have in_queue/in_progress; more submits get 429 "
    "(default: no limit).",
)
@click.option(
    "--max-submits-per-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="R",
    help="Accepted submits per second per token (token bucket); more get 429 with "
    "Retry-After (default: no limit).",
)
@click.option(
    "--submit-burst",
    type=click.FloatRange(min=1),
    default=None,
    metavar="N",
    help="Submits a token may make at once under --max-submits-per-s (default: max(1, R)).",
)
@click.option(
    "--balance",
    type=float,
    default=None,
    metavar="AMOUNT",
    help="Account balance; each accepted submit costs --cost-per-request, then error "
    "400002 (default: unlimited). Top up with POST /_emulator/balance.",
)
@click.option(
    "--cost-per-request",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.cost_per_request,
    show_default=True,
    help="What one accepted submit costs from --balance.",
)
@click.option(
    "--account-errors-as-200/--no-account-errors-as-200",
    default=False,
    show_default=True,
    help="Send the 400002 body with HTTP 200 instead of 400.",
)
@click.option(
    "--request-ttl-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Request ids expire this long after the request ends: status/result/cancel "
    "answer 404 with error_code 404001 (default: never).",
)
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def emulator_command(
    *,
    host: str,
    port: int,
    token: str | None,
    queue_s: float,
    queue_extra_s: float,
    run_s: float,
    run_sigma: float,
    capacity: int,
    images_per_set: int,
    video: bool,
    output_min_bytes: int,
    seed: int,
    fault_rates: tuple[str, ...],
    public_base_url: str | None,
    retry_after_s: float,
    max_concurrent: int | None,
    max_submits_per_s: float | None,
    submit_burst: float | None,
    balance: float | None,
    cost_per_request: float,
    account_errors_as_200: bool,
    request_ttl_s: float | None,
    log_level: str,
) -> None:
    """Run a local RunComfy Model API emulator (no real token needed)."""
    try:
        config = EmulatorConfig(
            token=token or None,
            queue_s=queue_s,
            queue_extra_s=queue_extra_s,
            run_s=run_s,
            run_sigma=run_sigma,
            capacity=capacity,
            images_per_set=images_per_set,
            video=video,
            output_min_bytes=output_min_bytes,
            seed=seed,
            fault_rates=_parse_rates(fault_rates),
            public_base_url=public_base_url,
            retry_after_s=retry_after_s,
            max_concurrent=max_concurrent,
            max_submits_per_s=max_submits_per_s,
            submit_burst=submit_burst,
            balance=balance,
            cost_per_request=cost_per_request,
            account_errors_as_200=account_errors_as_200,
            request_ttl_s=request_ttl_s,
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
