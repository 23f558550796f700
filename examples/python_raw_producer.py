#!/usr/bin/env python3
"""Enqueue a runcomfy-worker job with nothing but Redis: no Celery, no kombu.

This is what any language can do. The worker consumes Celery protocol 2 messages with a
JSON body from the Redis list ``runcomfy.submit``; kombu's Redis transport stores each
message as one JSON envelope, LPUSHed onto the list (workers BRPOP, so it is FIFO). The
envelope below is field for field what ``app.send_task("runcomfy.submit", ...)`` pushes.

The task takes ``[job_id, request]``: you pick the job id (``[A-Za-z0-9_-]{1,64}``); the
worker creates the job record itself. Sending the same job id twice runs the job once, so
deriving the id from your own key (an order number …) makes retries safe. ``request`` is a
``JobRequest`` (api_contracts/schemas/JobRequest.schema.json).

    REDIS_URL=redis://localhost:6379/0 python examples/python_raw_producer.py \\
        --prompt "a lighthouse at dusk" --size "2048x2048(1:1)" --webhook-url https://example.com/hook

Prints the job id; follow it with ``runcomfy-worker wait <id>``.
Only needs ``pip install redis``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import uuid
from typing import Any

import redis

QUEUE = "runcomfy.submit"  # the Redis list the worker reads
TASK = "runcomfy.submit"  # the Celery task name


def build_message(
    job_id: str,
    request: dict[str, Any],
    *,
    task_id: str | None = None,
    origin: str | None = None,
) -> dict[str, Any]:
    """The kombu/Redis envelope of ``runcomfy.submit(job_id, request)``, Celery protocol 2."""
    task_id = task_id or str(uuid.uuid4())
    args = [job_id, request]
    kwargs: dict[str, Any] = {}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, kwargs, embed]).encode("utf-8")
    return {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",  # Celery only accepts protocol 2 messages that say so
            "task": TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": repr(kwargs),
            "origin": origin or f"raw-producer@{socket.gethostname()}",
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def enqueue(client: redis.Redis, request: dict[str, Any], job_id: str | None = None) -> str:
    """Push one submit message; returns the job id."""
    job_id = job_id or uuid.uuid4().hex
    client.lpush(QUEUE, json.dumps(build_message(job_id, request)))
    return job_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Enqueue a runcomfy-worker job via raw Redis.")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--size", default="2048x2048(1:1)", help="e.g. 2048x2048(1:1) or 2048x2048")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--force-single", action="store_true")
    parser.add_argument("--webhook-url")
    parser.add_argument("--job-id", help="default: a random one")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    request: dict[str, Any] = {
        "input": {
            "prompt": args.prompt,
            "width\u00d7height": args.size,  # the wire name of the size field ("size" works too)
            "scale": args.scale,
            "force_single": args.force_single,
        },
        "metadata": dict(item.split("=", 1) for item in args.metadata),
    }
    if args.webhook_url:
        request["webhook_url"] = args.webhook_url
    client = redis.Redis.from_url(args.redis_url)
    try:
        print(enqueue(client, request, args.job_id))
    except redis.RedisError as exc:
        print(f"error: cannot enqueue via {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
