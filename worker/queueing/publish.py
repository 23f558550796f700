"""Sending the service's task messages: the contract queue, and a short ``argsrepr``.

Celery would otherwise build ``argsrepr`` with saferepr over the whole request (a third of the
cost of a publish, measured with ``make bench``) and print it in every "Task received" log
line; the job id is what a reader needs there, the record has the rest.

Nor is the queue declared on every publish (Celery's default, ``declare=[queue]``): kombu
binds a copy of the Queue to the channel each time before finding the declaration cached,
about a fifth of a publish's CPU (``python -m bench.profile_poll --job``). Declaring does not
route anything here: Celery sends to the default (anonymous) exchange with the queue's name
as routing key, which kombu's Redis transport turns into an LPUSH onto that very list, and
the workers declare their queues when they start consuming.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api_contracts.messages import QUEUE_FOR_TASK
from worker.jobs.handoff import Publisher


def send_message(
    app: Celery,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    countdown: float | None = None,
    producer: Any = None,
) -> None:
    """Publish ``task(*args, **kwargs)`` on its contract queue through ``app``."""
    queue = QUEUE_FOR_TASK[task]
    shown = [a if isinstance(a, str | int) else "…" for a in args]
    app.send_task(
        task,
        args=args,
        kwargs=kwargs or {},
        queue=queue,
        routing_key=queue,
        countdown=countdown or None,
        argsrepr=repr(shown),
        kwargsrepr=repr(sorted(kwargs or {})),
        producer=producer,
        declare=[],  # module docstring
    )


def make_publisher(app: Celery) -> Publisher:
    """A :class:`~worker.jobs.handoff.Publisher` that sends through ``app``."""

    def publish(task: str, args: list[Any], kwargs: dict[str, Any], countdown: float) -> None:
        send_message(app, task, args, kwargs, countdown=countdown)

    return publish
