"""Archive memory and speed: ``Archiver.archive_one`` streaming a 50 MB output from an HTTP
server into S3 (moto), next to boto3's ``upload_file`` of the same bytes from disk.

The measurement itself is bench/archive_memory.py (each mode in a fresh child process: peak RSS
growth from ``ru_maxrss``, median seconds of the timed runs).
"""

from __future__ import annotations

import statistics

from bench.archive_memory import measure
from bench.common import MIB, Row, Stack
from worker.settings import S3Settings

SIZE_BYTES = 50_000_000


def run(stack: Stack, quick: bool) -> list[Row]:
    """Peak RSS growth vs 2 parts + 16 MB; throughput vs upload_file."""
    repeat = 1 if quick else 3
    endpoint = stack.s3.endpoint_url if stack.s3 is not None else None
    results = {r["mode"]: r for r in measure(SIZE_BYTES, repeat, endpoint, trace=not quick)}
    ours, base = results["archive"], results["upload_file"]

    def mib_per_s(result: dict[str, float]) -> float:
        return result["bytes"] / MIB / statistics.median(result["seconds"])  # type: ignore[arg-type]

    part = S3Settings().part_size_bytes
    budget = 2 * part + 16 * MIB
    speed, base_speed = mib_per_s(ours), mib_per_s(base)
    peak = ours["tracemalloc_peak"]
    traced = "not run (quick)" if peak is None else f"{peak / MIB:.1f} MiB"
    return [
        Row(
            "archive: peak RSS growth, 50 MB output",
            ours["peak_rss_growth"] / MIB,
            "MiB",
            baseline=base["peak_rss_growth"] / MIB,
            target=f"≤ 2 parts + 16 MB = {budget / MIB:.0f} MiB",
            passed=ours["peak_rss_growth"] <= budget,
            note=(
                f"part {part / MIB:.0f} MiB; tracemalloc peak {traced}; "
                "baseline = boto3 upload_file from disk; after a warm-up over two parts"
            ),
            details={"archive": ours, "upload_file": base},
        ),
        Row(
            "archive: throughput, 50 MB output",
            speed,
            "MiB/s",
            baseline=base_speed,
            target="≥ 50 % of upload_file",
            passed=speed >= 0.5 * base_speed,
            note=f"median of {repeat} run(s) each; HTTP download + S3 multipart vs file upload",
        ),
    ]
