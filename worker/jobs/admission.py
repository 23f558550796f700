"""Protecting the RunComfy account: fleet-wide concurrency, a submit rate, a shared 429
cooldown, an account circuit, and fair shares across tenants and priorities.

Celery's Redis lists are FIFO and cannot reorder, so jobs do not wait in the broker: they
wait in the job store, and a Lua script hands out slots as they free::

    producer ──▶ runcomfy.submit ──▶ submit step
                                        │ no slot held (and a cap is configured)
                                        ▼
                    enter.lua: rcw:wait:<priority>:<tenant>  (FIFO per tenant)
                               rcw:rr:<priority>             (tenants, round-robin)
                               rcw:waiting                   (job -> priority|tenant)
                                        │
         admit.lua ◀── called when a job enters, when a slot frees (a job leaves upstream:
            │          archiving or final), and on every reconcile pass (the safety net)
            │  pause key set? admit none.  probing? one at a time (half-open circuit)
            │  free = RUNCOMFY_MAX_CONCURRENCY - |rcw:slots|
            │  priority by weighted round-robin (high 8 : normal 2 : low 1, no starvation)
            │  tenant by round-robin, skipping tenants at TENANT_MAX_CONCURRENCY
            ▼
    rcw:slots (+ rcw:slots:t:<tenant>) ──▶ the job's submit message is published again
                                        │ (a compare-and-set hand-off, seq + 1)
                                        ▼
           submit step, slot held: cooldown (429 seen by anyone)? wait it out.
                                   token bucket (RUNCOMFY_MAX_SUBMITS_PER_S) empty? wait.
                                   POST. 429 → shared cooldown. Account error → pause.

**A slot belongs to a job, not to a worker**, so a dead worker cannot leak one: the slot is
released when the job leaves upstream (``archiving`` or final), whoever moves it, and every
reconcile pass audits the holders (O(slots)) and frees those whose job is no longer in
upstream. **A lost message cannot strand a waiting job**: waiting jobs are in Redis, and
every reconcile pass admits what fits. Waiting jobs are not subject to ``JOB_DEADLINE_S``
while they wait; the deadline counts from admission.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import redis

from api_contracts.jobs import JobRequest
from worker.jobs.store import script
from worker.services.redis_client import as_text

log = logging.getLogger(__name__)

WAITING_KEY: Final = "rcw:waiting"
SLOTS_KEY: Final = "rcw:slots"
PAUSE_KEY: Final = "rcw:pause"
PROBING_KEY: Final = "rcw:pause:probing"
CREDITS_KEY: Final = "rcw:wrr"
BUCKET_KEY: Final = "rcw:bucket"
COOLDOWN_KEY: Final = "rcw:cooldown"
#: The tenant of jobs that name none ("~" is not a valid tenant, so nobody can claim it).
DEFAULT_TENANT: Final = "~"
#: Weighted round-robin credits of high, normal and low.
PRIORITY_WEIGHTS: Final = (8, 2, 1)


def tenant_of(request: JobRequest | None) -> str:
    """The waiting-room tenant of a request."""
    return (request.tenant if request is not None else None) or DEFAULT_TENANT


def priority_of(request: JobRequest | None) -> str:
    """The waiting-room priority of a request."""
    return request.priority if request is not None else "normal"


@dataclass(frozen=True)
class Pause:
    """Why submissions are paused fleet-wide (an account error), and since when."""

    code: str
    message: str
    since: float


Circuit = Literal["closed", "open", "probing"]


class Admission(Protocol):
    """What the steps ask before they POST a generation."""

    #: caps are configured: every job needs a slot before it is submitted
    enabled: bool

    def holds_slot(self, job_id: str) -> bool:
        """Has the job been admitted (and not released)?"""
        ...

    def circuit(self) -> Circuit:
        """closed: submit; open: nobody submits; probing: one admitted job tries."""
        ...

    def gate(self) -> tuple[Circuit, int]:
        """:meth:`circuit` and :meth:`cooldown_ms` at once: what a submit asks first."""
        ...

    def enter(self, job_id: str, request: JobRequest | None, *, front: bool = False) -> int:
        """Put a job in the waiting room: 1 entered, 0 already waiting, 2 holds a slot."""
        ...

    def admit(self, now: float, at_most: int = 64) -> list[str]:
        """Hand free slots to waiting jobs; the job ids admitted."""
        ...

    def release(self, job_id: str, request: JobRequest | None) -> bool:
        """Free the job's slot (it left upstream); True if it held one."""
        ...

    def leave(self, job_id: str) -> None:
        """Take a job out of the waiting room (cancelled or failed while waiting)."""
        ...

    def position(self, job_id: str, request: JobRequest | None) -> int | None:
        """Jobs ahead of it in its tenant and priority, or None when not waiting."""
        ...

    def cooldown_ms(self) -> int:
        """How long every submit still waits after a 429 (0: none)."""
        ...

    def start_cooldown(self, seconds: float) -> None:
        """A 429 pauses every submit fleet-wide for ``seconds`` (never shortens one)."""
        ...

    def take_token(self) -> int:
        """0 when a submit may go now, else milliseconds until the bucket has a token."""
        ...

    def pause(self, code: str, message: str, *, now: float) -> None:
        """Open the circuit: no admission until the probe interval passes or a resume."""
        ...

    def paused(self) -> Pause | None:
        """The open circuit's reason, or None."""
        ...

    def submitted(self) -> None:
        """A submit went through: a half-open circuit closes."""
        ...

    def resume(self) -> None:
        """Close the circuit now (``runcomfy-worker resume``)."""
        ...

    def holders(self) -> list[str]:
        """Every job holding a slot (audited by the reconciler)."""
        ...


class NoAdmission:
    """No fleet-wide state at all (unit tests of the steps): no caps, no cooldown, no
    circuit; every job goes straight to upstream."""

    enabled = False

    def holds_slot(self, job_id: str) -> bool:
        """Never: there are no slots."""
        return False

    def circuit(self) -> Circuit:
        """Always closed."""
        return "closed"

    def gate(self) -> tuple[Circuit, int]:
        """Closed, no cooldown."""
        return "closed", 0

    def enter(self, job_id: str, request: JobRequest | None, *, front: bool = False) -> int:
        """Never waits."""
        return 2

    def admit(self, now: float, at_most: int = 64) -> list[str]:
        """Nothing waits."""
        return []

    def release(self, job_id: str, request: JobRequest | None) -> bool:
        """No slots."""
        return False

    def leave(self, job_id: str) -> None:
        """Nothing waits."""

    def position(self, job_id: str, request: JobRequest | None) -> int | None:
        """Nothing waits."""
        return None

    def cooldown_ms(self) -> int:
        """No shared cooldown."""
        return 0

    def start_cooldown(self, seconds: float) -> None:
        """No shared cooldown."""

    def take_token(self) -> int:
        """No rate limit."""
        return 0

    def pause(self, code: str, message: str, *, now: float) -> None:
        """No circuit."""

    def paused(self) -> Pause | None:
        """Never paused."""
        return None

    def submitted(self) -> None:
        """No circuit."""

    def resume(self) -> None:
        """No circuit."""

    def holders(self) -> list[str]:
        """No slots."""
        return []


class RedisAdmission:
    """:class:`Admission` in Redis, shared by the whole fleet."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_concurrency: int | None,
        tenant_max_concurrency: int | None,
        max_submits_per_s: float | None,
        probe_interval_s: float,
    ) -> None:
        self.redis = client
        self.max_concurrency = max_concurrency
        self.tenant_max = tenant_max_concurrency
        self.rate = max_submits_per_s
        self.probe_interval_s = probe_interval_s
        #: jobs wait in the job store only when a cap is set; a rate limit alone just delays
        self.enabled = max_concurrency is not None or tenant_max_concurrency is not None
        self._enter = client.register_script(script("enter.lua"))
        self._admit = client.register_script(script("admit.lua"))
        self._bucket = client.register_script(script("bucket.lua"))

    def holds_slot(self, job_id: str) -> bool:
        """Has the job been admitted?"""
        return self.redis.zscore(SLOTS_KEY, job_id) is not None

    def circuit(self) -> Circuit:
        """open while the pause key lives, probing after it expired until a submit works."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(PAUSE_KEY)
            pipe.exists(PROBING_KEY)
            hard, probing = pipe.execute()
        if hard:
            return "open"
        return "probing" if probing else "closed"

    def gate(self) -> tuple[Circuit, int]:
        """The circuit and the cooldown in one round trip (EXISTS, EXISTS, PTTL)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(PAUSE_KEY)
            pipe.exists(PROBING_KEY)
            pipe.pttl(COOLDOWN_KEY)
            hard, probing, left = pipe.execute()
        circuit: Circuit = "open" if hard else "probing" if probing else "closed"
        return circuit, max(0, int(left))

    def enter(self, job_id: str, request: JobRequest | None, *, front: bool = False) -> int:
        """Put a job in the waiting room (``enter.lua``)."""
        tenant, priority = tenant_of(request), priority_of(request)
        keys = [WAITING_KEY, _queue(priority, tenant), f"rcw:rr:{priority}", SLOTS_KEY]
        args = [job_id, f"{priority}|{tenant}", tenant, "front" if front else "back"]
        return int(self._enter(keys=keys, args=args))

    def admit(self, now: float, at_most: int = 64) -> list[str]:
        """Hand out free slots (``admit.lua``); without caps it only lets jobs out that
        waited for the circuit."""
        flat = self._admit(
            keys=[WAITING_KEY, SLOTS_KEY, PAUSE_KEY, PROBING_KEY, CREDITS_KEY],
            args=[
                self.max_concurrency if self.max_concurrency is not None else -1,
                self.tenant_max if self.tenant_max is not None else -1,
                at_most,
                repr(now),
                ",".join(str(w) for w in PRIORITY_WEIGHTS),
            ],
        )
        return [as_text(flat[i]) for i in range(0, len(flat), 2)]

    def release(self, job_id: str, request: JobRequest | None) -> bool:
        """Free the job's slot (and its tenant's)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(SLOTS_KEY, job_id)
            pipe.zrem(f"rcw:slots:t:{tenant_of(request)}", job_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def leave(self, job_id: str) -> None:
        """Forget a waiting job; its queue entry is skipped when its turn comes."""
        self.redis.hdel(WAITING_KEY, job_id)

    def position(self, job_id: str, request: JobRequest | None) -> int | None:
        """LPOS in its tenant queue (jobs of other tenants take turns in between)."""
        found = self.redis.lpos(_queue(priority_of(request), tenant_of(request)), job_id)
        return int(found) if isinstance(found, int) else None

    def cooldown_ms(self) -> int:
        """PTTL of the shared cooldown."""
        left = int(self.redis.pttl(COOLDOWN_KEY))
        return max(0, left)

    def start_cooldown(self, seconds: float) -> None:
        """Set (or lengthen) the shared cooldown."""
        ms = max(1, int(seconds * 1000))
        if self.cooldown_ms() < ms:
            self.redis.set(COOLDOWN_KEY, "429", px=ms)

    def take_token(self) -> int:
        """``bucket.lua``: 0, or milliseconds to wait."""
        if self.rate is None:
            return 0
        burst = max(1.0, self.rate)
        return int(self._bucket(keys=[BUCKET_KEY], args=[repr(self.rate), repr(burst)]))

    def pause(self, code: str, message: str, *, now: float) -> None:
        """Open the circuit for one probe interval, then half-open (one job at a time)."""
        reason = json.dumps({"code": code, "message": message[:500], "since": now})
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(PAUSE_KEY, reason, px=max(1, int(self.probe_interval_s * 1000)))
            pipe.set(PROBING_KEY, reason)
            pipe.execute()

    def paused(self) -> Pause | None:
        """The reason stored with the circuit (open, or half-open while probing)."""
        raw = self.redis.get(PAUSE_KEY) or self.redis.get(PROBING_KEY)
        if raw is None:
            return None
        data = json.loads(raw)
        return Pause(str(data["code"]), str(data["message"]), float(data["since"]))

    def submitted(self) -> None:
        """A submit succeeded: the account works, close the circuit."""
        if self.redis.exists(PROBING_KEY):
            self.redis.delete(PROBING_KEY, PAUSE_KEY)
            log.warning("account circuit closed: a submit went through")

    def resume(self) -> None:
        """Close the circuit now."""
        self.redis.delete(PROBING_KEY, PAUSE_KEY)

    def holders(self) -> list[str]:
        """Every slot holder."""
        return [
            as_text(m) for m in self.redis.zrange(SLOTS_KEY, 0, -1) if isinstance(m, bytes | str)
        ]


def _queue(priority: str, tenant: str) -> str:
    return f"rcw:wait:{priority}:{tenant}"
