"""Loaded by every bench child process (bench/_inject is first on its PYTHONPATH).

Does nothing unless ``BENCH_REDIS_COUNT_FILE`` is set; then counts this process's Redis round
trips (bench/redis_counter.py). Kept tiny: it runs at interpreter start-up.
"""

import os

if os.environ.get("BENCH_REDIS_COUNT_FILE"):
    from bench.redis_counter import start_dumping

    start_dumping(os.environ["BENCH_REDIS_COUNT_FILE"])
