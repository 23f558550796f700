"""The emulator's queue: states computed from a clock, no background threads.

Every request waits at least its ``queue_s``; then requests start in the order their waits end
(submission order when every request has the same ``queue_s``) as soon as one of ``capacity``
slots is free, and run for their ``run_s``. The scheduler is
advanced lazily to "now" whenever someone looks, which gives the same answer a background
loop would have reached.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from worker.devtools.emulator.faults import RequestFault

State = Literal["in_queue", "in_progress", "completed", "cancelled", "failed"]
FINAL_STATES: frozenset[State] = frozenset({"completed", "cancelled", "failed"})


@dataclass(eq=False)  # identity: the waiting line finds and removes by object
class EmulatedRequest:
    """One submitted generation and the timeline the scheduler gave it."""

    request_id: str
    model_id: str
    width: int
    height: int
    force_single: bool
    submitted_at: float
    queue_s: float
    run_s: float
    images: int
    videos: int
    min_bytes: int
    fault: RequestFault | None = None
    #: the prompt, as submitted (lets tests and the chaos run count submits per job)
    prompt: str = ""
    #: who submitted it (a fingerprint of the Bearer token, never the token itself)
    token_key: str = ""
    #: seconds after reaching a final state before the id expires (None: never)
    ttl_s: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    cancelled_by_client: bool = False
    ready_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.ready_at = self.submitted_at + self.queue_s

    def state(self, now: float) -> State:
        """The state at ``now`` (the scheduler must have been advanced to ``now``)."""
        if self.cancelled_by_client:
            return "cancelled"
        if self.started_at is None:
            # An upstream-side cancel happens at the moment the request would have started.
            if self.ended_at is not None and self.ended_at <= now:
                return "cancelled"
            return "in_queue"
        assert self.ended_at is not None
        if now < self.ended_at:
            return "in_progress"
        return "failed" if self.fault == "fail" else "completed"

    def in_upstream(self, now: float) -> bool:
        """Whether it is still ``in_queue`` or ``in_progress`` at ``now`` (scheduler advanced)."""
        return self.state(now) in ("in_queue", "in_progress")

    def expired(self, now: float) -> bool:
        """Whether its id has expired: ``ttl_s`` or more since it reached a final state."""
        return (
            self.ttl_s is not None
            and self.ended_at is not None
            and not self.in_upstream(now)
            and now >= self.ended_at + self.ttl_s
        )


def _ready_at(request: EmulatedRequest) -> float:
    return request.ready_at


class Scheduler:
    """Requests by id, the waiting line and the running slots."""

    def __init__(self) -> None:
        self._requests: dict[str, EmulatedRequest] = {}
        self._waiting: deque[EmulatedRequest] = deque()
        self._running: list[float] = []  # heap of end times of started requests
        self._last_start = -math.inf

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: EmulatedRequest) -> None:
        """Put a new request in the line: behind every request whose wait ends first."""
        self._requests[request.request_id] = request
        if not self._waiting or self._waiting[-1].ready_at <= request.ready_at:
            self._waiting.append(request)
            return
        index = bisect.bisect_right(self._waiting, request.ready_at, key=_ready_at)
        self._waiting.insert(index, request)

    def add_running(self, requests: Iterable[EmulatedRequest], started_at: float) -> None:
        """Put requests straight into running slots, started at ``started_at`` (seeded ones:
        no waiting line and no capacity check; they hold their slots until they end)."""
        for request in requests:
            request.started_at = started_at
            request.ended_at = started_at + request.run_s
            self._requests[request.request_id] = request
            self._running.append(request.ended_at)
        heapq.heapify(self._running)

    def get(self, request_id: str) -> EmulatedRequest | None:
        """The request with that id, if any."""
        return self._requests.get(request_id)

    def all(self) -> list[EmulatedRequest]:
        """Every request, in submission order."""
        return list(self._requests.values())

    def advance(self, now: float, capacity: int) -> None:
        """Start every waiting request whose start time (given ``capacity``) is at or before now."""
        while self._waiting:
            head = self._waiting[0]
            earliest = max(head.ready_at, self._last_start)
            while self._running and self._running[0] <= earliest:
                heapq.heappop(self._running)
            busy = len(self._running) - capacity + 1
            start = (
                earliest if busy <= 0 else max(earliest, heapq.nsmallest(busy, self._running)[-1])
            )
            if start > now:
                return
            while self._running and self._running[0] <= start:
                heapq.heappop(self._running)
            self._waiting.popleft()
            self._last_start = start
            if head.fault == "cancel":
                head.ended_at = start
                continue
            head.started_at = start
            head.ended_at = start + head.run_s
            heapq.heappush(self._running, head.ended_at)

    def queue_position(self, request: EmulatedRequest) -> int:
        """How many requests are ahead of this waiting one (0: next to start)."""
        return self._waiting.index(request)

    def cancel(self, request: EmulatedRequest, now: float) -> None:
        """Cancel a waiting request on the client's demand (caller checked it is in_queue)."""
        self._waiting.remove(request)
        request.cancelled_by_client = True
        request.ended_at = now

    def counts(self, now: float) -> dict[str, int]:
        """How many requests are in each state."""
        counts = dict.fromkeys(("in_queue", "in_progress", "completed", "cancelled", "failed"), 0)
        for request in self._requests.values():
            counts[request.state(now)] += 1
        return counts
