"""Names shared by the worker, the producer side and operators' tooling, in one place."""

from __future__ import annotations

from typing import Final

#: Every Redis key this service writes starts with this.
KEY_PREFIX: Final = "rcw:"
#: One hash per job: ``rcw:job:<job_id>``.
JOB_KEY_PREFIX: Final = KEY_PREFIX + "job:"
#: Idempotency index: ``rcw:idem:<idempotency_key>`` -> job id (SET NX).
IDEMPOTENCY_KEY_PREFIX: Final = KEY_PREFIX + "idem:"
#: Sorted set of jobs not yet final, scored by creation time (metrics, autoscaling, sweeps).
INFLIGHT_KEY: Final = KEY_PREFIX + "inflight"
#: Due index: sorted set of jobs that still expect progress (every non-final job, and final
#: ones with a webhook to send), scored by when that progress is overdue (Redis TIME, epoch s).
DUE_KEY: Final = KEY_PREFIX + "due"
#: Lease lock held by the one reconcile pass running fleet-wide (value: its owner).
RECONCILE_LOCK_KEY: Final = KEY_PREFIX + "reconcile:lock"
#: The wake loop's lock (one wake pass per RECONCILE_WAKE_S fleet-wide).
WAKE_LOCK_KEY: Final = KEY_PREFIX + "wake:lock"
#: Learned run times: ``<prefix><model>|<W>x<H>|<single|set>:cur`` / ``:old`` hashes.
RUNTIMES_KEY_PREFIX: Final = KEY_PREFIX + "runtimes:"
#: Pub/sub channel prefix; every change of job X is published on ``rcw:events:<X>``.
EVENTS_CHANNEL_PREFIX: Final = KEY_PREFIX + "events:"
#: Counter hash of service-wide figures (ambiguous submits, malformed messages …).
STATS_KEY: Final = KEY_PREFIX + "stats"
#: Dead letters: a capped list (newest first) of broker messages that could not be turned into
#: a runnable task, one JSON entry each (reason, time, queue, the raw message).
DEAD_LETTERS_KEY: Final = KEY_PREFIX + "dead"
#: At most this many dead letters are kept (older ones are trimmed on each new one).
DEAD_LETTERS_MAX: Final = 10_000
#: At most this many bytes of a dead message are kept; a longer one cannot be requeued.
DEAD_LETTER_RAW_MAX_BYTES: Final = 64 * 1024

#: Upstream documented limits for output files.
MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
MAX_VIDEO_BYTES: Final = 100 * 1024 * 1024
