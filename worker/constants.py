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
#: Pub/sub channel prefix; every change of job X is published on ``rcw:events:<X>``.
EVENTS_CHANNEL_PREFIX: Final = KEY_PREFIX + "events:"
#: Counter hash of service-wide figures (ambiguous submits, malformed messages …).
STATS_KEY: Final = KEY_PREFIX + "stats"

#: Upstream documented limits for output files.
MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
MAX_VIDEO_BYTES: Final = 100 * 1024 * 1024
