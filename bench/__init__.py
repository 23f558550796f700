"""Benchmarks: ``python -m bench`` (``make bench``) and ``python -m bench --quick``.

Every figure is a ratio to a floor measured in the same run on the same machine (embedded
Redis, moto S3, the RunComfy emulator), printed as one table and written to bench/results/.
Modules: ``enqueue``, ``archive`` (with ``archive_memory``), ``polling``, ``throughput``,
``inflight``; ``baseline_app`` holds the floors' Celery tasks, ``common`` the stack,
``redis_counter`` the round-trip counter. Not part of ``make test``.
"""
