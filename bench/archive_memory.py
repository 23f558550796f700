"""Peak memory and throughput of ``Archiver.archive_one`` on a 40 MiB output, next to boto3's
``upload_file`` of the same bytes from disk.

Run: ``.venv/bin/python bench/archive_memory.py [--size-mib 40] [--repeat 3]``; ``python -m bench``
uses :func:`measure` for its archive rows (50 MB, against the stack's moto).

The S3 endpoint (moto) and the file server (``python -m http.server``) run as separate
processes, and each measurement runs in a fresh child process, so the figures are the
archiver's own: peak RSS growth (the kernel's peak mark ``VmHWM``, reset after a warm-up over
two parts, minus the RSS just before the timed runs) and tracemalloc's peak of Python
allocations (a second, separate run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
BUCKET = "bench-archive"
#: The warm-up file: over two default parts (8 MiB), so multipart code paths are loaded too.
WARM_BYTES = 17 * MIB
HERE = Path(__file__).resolve()


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last :func:`reset_peak`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0), so the
    warm-up's transient buffers do not count as the measured run's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # the peak then covers the warm-up too: an over-estimate, never an under-


def child(
    mode: str, endpoint: str, source: str, path: str, repeat: int, trace: bool = True
) -> dict[str, Any]:
    """One measurement, in a fresh process: warm up, then time and measure ``mode``; with
    ``trace``, one more run under tracemalloc."""
    import boto3
    import httpx
    from boto3.s3.transfer import TransferConfig

    from api_contracts.jobs import OutputKind
    from worker.services.s3 import MAX_IMAGE_BYTES, Archiver, make_s3_client
    from worker.settings import S3Settings

    settings = S3Settings(bucket=BUCKET, endpoint_url=endpoint, region="us-east-1")
    s3 = make_s3_client(settings)
    http = httpx.Client(timeout=60.0)
    archiver = Archiver(s3, settings, http)
    size = Path(path).stat().st_size
    folder = source.rsplit("/", 1)[0]
    warm_source, warm_path = f"{folder}/warm.png", str(Path(path).with_name("warm.png"))
    kind = OutputKind.IMAGE if size <= MAX_IMAGE_BYTES else OutputKind.VIDEO

    def run(url: str = source, file: str = path) -> None:
        job = f"bench-{uuid.uuid4().hex[:8]}"
        if mode == "archive":
            archiver.archive_one(job_id=job, request_id="r", index=0, kind=kind, source_url=url)
        else:
            s3.upload_file(file, BUCKET, f"{job}/0.png", Config=TransferConfig())

    # Warm up every code path (multipart included: the warm file is over two parts) so that
    # imports and lazy loading are not counted, then start the peak afresh.
    run(warm_source, warm_path)
    boto3.set_stream_logger("nothing", level=100)  # loads logging machinery now, not later
    reset_peak()

    before = rss_bytes()
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    peak_growth = peak_rss_bytes() - before

    traced_peak = None
    if trace:
        tracemalloc.start()
        run()
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    http.close()
    s3.close()
    return {
        "mode": mode,
        "bytes": size,
        "seconds": seconds,
        "rss_before": before,
        "peak_rss_growth": peak_growth,
        "tracemalloc_peak": traced_peak,
    }


def wait_for(url: str, timeout_s: float = 20.0) -> None:
    """Poll until ``url`` answers at all (start-up of a child server)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def write_file(path: Path, size: int) -> None:
    """Pseudo-random bytes (incompressible), written 1 MiB at a time."""
    rng = random.Random(42)
    with path.open("wb") as out:
        left = size
        while left:
            block = rng.randbytes(min(MIB, left))
            out.write(block)
            left -= len(block)


def measure(
    size_bytes: int, repeat: int, endpoint: str | None = None, *, trace: bool = True
) -> list[dict[str, Any]]:
    """Run both modes (each in a fresh child process) on ``size_bytes`` of random data.

    The file server always runs here as a child process; so does moto unless ``endpoint``
    names an S3 endpoint that is already up (the bucket is created if missing)."""
    import boto3

    from worker.devtools.embedded import EmbeddedS3, env_with, free_port

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        big = Path(tmp) / "big.png"
        write_file(big, size_bytes)
        write_file(Path(tmp) / "small.png", 10_000)
        write_file(Path(tmp) / "warm.png", WARM_BYTES)
        http_port = free_port()
        env = env_with(
            {
                "AWS_ACCESS_KEY_ID": EmbeddedS3.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": EmbeddedS3.SECRET_KEY,
                "AWS_DEFAULT_REGION": EmbeddedS3.REGION,
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            }
        )
        servers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    "--bind",
                    "127.0.0.1",
                    "-d",
                    tmp,
                    str(http_port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        if endpoint is None:
            s3_port = free_port()
            endpoint = f"http://127.0.0.1:{s3_port}"
            servers.append(
                subprocess.Popen(
                    [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            wait_for(endpoint)
            wait_for(f"http://127.0.0.1:{http_port}/small.png")
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=EmbeddedS3.ACCESS_KEY,
                aws_secret_access_key=EmbeddedS3.SECRET_KEY,
                region_name=EmbeddedS3.REGION,
            )
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            results = []
            for mode in ("archive", "upload_file"):
                source = f"http://127.0.0.1:{http_port}/big.png"
                out = subprocess.run(
                    [
                        *(sys.executable, str(HERE), "--child", mode, "--endpoint", endpoint),
                        *("--source", source, "--path", str(big), "--repeat", str(repeat)),
                        *(() if trace else ("--no-trace",)),
                    ],
                    env=env,
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if out.returncode:
                    raise RuntimeError(f"{mode} run failed:\n{out.stderr[-4000:]}")
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
    return results


def main() -> None:
    """Start the servers, run each mode in a child process, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=40.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["archive", "upload_file"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    args = parser.parse_args()

    if args.child:
        result = child(
            args.child, args.endpoint, args.source, args.path, args.repeat, not args.no_trace
        )
        print(json.dumps(result))
        return

    try:
        results = measure(int(args.size_mib * MIB), args.repeat, trace=not args.no_trace)
    except RuntimeError as exc:
        sys.exit(str(exc))

    print(f"object: {args.size_mib:g} MiB, part size 8 MiB, {args.repeat} timed runs each")
    print(f"{'mode':<12} {'median s':>9} {'MiB/s':>8} {'peak RSS growth':>16} {'tracemalloc':>12}")
    for r in results:
        median = statistics.median(r["seconds"])
        traced = "-" if r["tracemalloc_peak"] is None else f"{r['tracemalloc_peak'] / MIB:.1f}"
        print(
            f"{r['mode']:<12} {median:>9.3f} {r['bytes'] / MIB / median:>8.1f} "
            f"{r['peak_rss_growth'] / MIB:>12.1f} MiB {traced:>8} MiB"
        )


if __name__ == "__main__":
    main()
