"""``python -m bench [--quick] [--only NAME ...]``: every figure as a ratio to a floor measured
in the same run, one table, JSON under bench/results/.

Exit status: 0 when every figure ran (PASS or MISS alike), 1 when one crashed (its rows are
replaced by an ERROR row and the others still run), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import redis_counter
from bench.common import AWS_ENV, Row, Stack, fmt

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Figure = Callable[[Stack, bool], list[Row]]


def _figures() -> dict[str, Figure]:
    from bench import account, archive, enqueue, fleet, inflight, polling, throughput

    # Order: cheap and independent first, so a crash late still leaves most of the table.
    return {
        "enqueue": enqueue.run,
        "archive": archive.run,
        "polling": polling.run,
        "throughput": throughput.run,
        "inflight": inflight.run,
        "account": account.run,
        "fleet": fleet.run,
    }


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    if ratio >= 100:
        return f"{ratio:,.0f}"
    return f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.2f}"


def render(rows: list[Row]) -> str:
    """The table: figure | value | baseline | ratio | target | verdict, then notes."""
    header = ("figure", "value", "baseline", "ratio", "target", "")
    lines = [
        (
            r.figure,
            fmt(r.value, r.unit),
            fmt(r.baseline, r.baseline_unit or r.unit),
            _ratio(r.ratio),
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def join(cells: tuple[str, ...]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [join(header), "-+-".join("-" * w for w in widths)]
    out += [join(line) for line in lines]
    notes = [f"  [{i + 1}] {r.figure}: {r.note}" for i, r in enumerate(rows) if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def write_results(rows: list[Row], meta: dict[str, Any]) -> Path:
    """bench/results/bench-<UTC>.json and latest.json; returns the timestamped path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"bench-{stamp}{'-quick' if meta['quick'] else ''}.json"
    text = json.dumps({**meta, "rows": [r.as_json() for r in rows]}, indent=2, default=str)
    path.write_text(text + "\n")
    (RESULTS_DIR / "latest.json").write_text(text + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the figures, print the table, write the JSON; 1 if any figure crashed."""
    figures = _figures()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under a minute")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(figures), metavar="FIGURE",
        help=f"run only these ({', '.join(figures)})",
    )  # fmt: skip
    args = parser.parse_args(argv)

    os.environ.update(AWS_ENV)  # boto3 in this process never looks for real credentials
    redis_counter.install()  # the producer side of the round-trip count
    chosen = {name: fn for name, fn in figures.items() if not args.only or name in args.only}
    rows: list[Row] = []
    crashed: list[str] = []
    timings: dict[str, float] = {}
    started = time.monotonic()
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"bench: {'quick' if args.quick else 'full'} run of {', '.join(chosen)}", flush=True)
    with Stack() as stack:
        for name, figure in chosen.items():
            t0 = time.monotonic()
            try:
                got = figure(stack, args.quick)
            except Exception as exc:
                crashed.append(name)
                traceback.print_exc()
                got = [Row(f"{name}: crashed", None, "", target="—", note=repr(exc), error=True)]
            timings[name] = round(time.monotonic() - t0, 1)
            print(f"  {name}: {len(got)} row(s) in {timings[name]:.0f}s", flush=True)
            rows.extend(got)
    elapsed = time.monotonic() - started
    meta = {
        "quick": args.quick,
        "started_utc": started_utc,
        "seconds": round(elapsed, 1),
        "seconds_per_figure": timings,
        "crashed": crashed,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print()
    print(render(rows))
    path = write_results(rows, meta)
    missed = sum(r.passed is False for r in rows)
    print(
        f"\n{len(rows)} rows, {missed} missed, {len(crashed)} crashed, {elapsed:.0f}s; "
        f"written to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
    )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
