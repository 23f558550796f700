"""How many status calls per second the RunComfy emulator answers.

The emulator runs in this process; client processes (so they do not share its GIL) each run
several threads, every thread with its own keep-alive ``httpx.Client``, polling the status of
a set of queued requests round robin. Prints the client-side and server-side rates.

    .venv/bin/python bench/emulator_rate.py [--seconds 5] [--processes 2] [--threads 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import threading
import time
from multiprocessing.synchronize import Barrier, Event

import httpx

from worker.devtools.emulator import EmulatorConfig, EmulatorServer

TOKEN = "bench-token"
MODEL = "bytedance/dreamina-4-0/text-to-image"


def _client_process(
    base_url: str,
    request_ids: list[str],
    threads: int,
    seconds: float,
    ready: Barrier,
    go: Event,
    results: mp.Queue[tuple[int, int]],
) -> None:
    counts = [0] * threads
    errors = [0] * threads

    def hammer(slot: int) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
            client.get(f"/v1/requests/{request_ids[0]}/status")  # open the connection first
            go.wait()
            deadline = time.monotonic() + seconds
            i = slot
            while time.monotonic() < deadline:
                answer = client.get(f"/v1/requests/{request_ids[i % len(request_ids)]}/status")
                if answer.status_code == 200:
                    counts[slot] += 1
                else:
                    errors[slot] += 1
                i += 1

    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    for worker in workers:
        worker.join()
    results.put((sum(counts), sum(errors)))


def main() -> None:
    """Start the emulator, hammer its status endpoint, print calls per second."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="queued requests polled")
    args = parser.parse_args()

    config = EmulatorConfig(token=TOKEN, queue_s=3600, run_s=3600, capacity=8)
    with EmulatorServer(config) as emulator:
        with httpx.Client(
            base_url=emulator.base_url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as c:
            ids = [
                c.post(f"/v1/models/{MODEL}", json={"prompt": f"bench {n}"}).json()["request_id"]
                for n in range(args.requests)
            ]
        context = mp.get_context("spawn")
        ready = context.Barrier(args.processes + 1)
        go = context.Event()
        results: mp.Queue[tuple[int, int]] = context.Queue()
        processes = [
            context.Process(
                target=_client_process,
                args=(emulator.base_url, ids, args.threads, args.seconds, ready, go, results),
            )
            for _ in range(args.processes)
        ]
        for process in processes:
            process.start()
        ready.wait()
        before = emulator.counters()["status_calls"]
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        go.set()
        totals = [results.get() for _ in processes]
        elapsed = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        served = emulator.counters()["status_calls"] - before
        for process in processes:
            process.join()
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    ok = sum(t[0] for t in totals)
    errors = sum(t[1] for t in totals)
    print(
        f"{args.processes} processes x {args.threads} threads, {args.seconds:.0f} s: "
        f"{ok / args.seconds:,.0f} status calls/s answered 200 "
        f"(server counted {served / elapsed:,.0f}/s over {elapsed:.1f} s, {errors} errors)"
    )
    if served:
        per_call_us = cpu_s / served * 1e6
        print(
            f"emulator process CPU: {per_call_us:.0f} us per status call "
            f"(~{1e6 / per_call_us:,.0f} calls/s per fully used core)"
        )


if __name__ == "__main__":
    main()
