"""Building and starting a worker: settings → logging → app with tasks → metrics/heartbeat
→ ``celery worker``.

``celery -A worker.app worker`` and ``runcomfy-worker worker`` both come through
:func:`worker_app`. Clients are built when a worker process starts (``worker_process_init``
under prefork, ``worker_init`` otherwise), never at import.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click
import redis
from celery import signals

from api_contracts.messages import ALL_QUEUES
from worker.constants import WAKE_LOCK_KEY
from worker.errors import ConfigError
from worker.health import install_heartbeat
from worker.jobs.handoff import Handoff, Publisher
from worker.jobs.reconcile import ReconcileLoop, Reconciler, redis_lock
from worker.logs import configure_logging
from worker.metrics import start_metrics_server
from worker.queueing.config import ServiceCelery, celery_config
from worker.queueing.publish import make_publisher
from worker.queueing.tasks import register_tasks
from worker.runtime import Runtime
from worker.services.redis_client import as_text, make_redis, master_password
from worker.settings import Settings, load_settings

log = logging.getLogger(__name__)

DEFAULT_POOL = "threads"
DEFAULT_CONCURRENCY = "8"


def worker_argv(extra: list[str]) -> list[str]:
    """``celery worker`` arguments: ours by default, the caller's where given."""
    argv = ["worker"]
    given = set(extra)
    if not given & {"-Q", "--queues"} and not any(a.startswith("--queues=") for a in extra):
        argv += ["-Q", ",".join(ALL_QUEUES)]
    if not given & {"-P", "--pool"} and not any(a.startswith("--pool=") for a in extra):
        argv += ["-P", DEFAULT_POOL]
    if not given & {"-c", "--concurrency"} and not any(
        a.startswith("--concurrency=") for a in extra
    ):
        argv += ["-c", DEFAULT_CONCURRENCY]
    if not given & {"-l", "--loglevel"} and not any(a.startswith("--loglevel=") for a in extra):
        argv += ["-l", "INFO"]
    return argv + extra


def secret_values(settings: Settings) -> list[str]:
    """Every secret the process knows, for the log redaction filter (defence in depth)."""
    values = []
    if settings.runcomfy.api_token is not None:
        values.append(settings.runcomfy.api_token.get_secret_value())
    for secret in settings.webhook.secret:
        raw = secret.get_secret_value()
        values += [raw, raw.removeprefix("whsec_")]
    values += [os.environ.get(n, "") for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    for redis_secret in (settings.redis.password, settings.redis.sentinel_password):
        if redis_secret is not None:
            values.append(redis_secret.get_secret_value())
    values.append(master_password(settings.redis) or "")
    return [v for v in values if len(v) >= 6]


def create_app(settings: Settings | None = None) -> ServiceCelery:
    """Build the app (tasks registered, signals connected). No connection is opened here."""
    settings = settings or load_settings()
    app = ServiceCelery(settings)
    app.conf.update(celery_config(settings))
    register_tasks(app)
    _connect_runtime_signals(app)
    _connect_reconciler(app)
    return app


def make_reconciler(rt: Runtime, publish: Publisher) -> Reconciler:
    """A reconciler over this Runtime's store, publishing through ``publish``."""
    settings = rt.settings
    return Reconciler(
        Handoff(
            rt.store,
            publish,
            max_countdown_s=settings.max_countdown_s,
            grace_s=settings.reconcile.grace_s,
            admission=rt.admission,
        ),
        lambda: rt.runcomfy,
        deadline_s=settings.job.deadline_s,
        interval_s=settings.reconcile.interval_s,
        batch=settings.reconcile.batch,
    )


def _connect_reconciler(app: ServiceCelery) -> None:
    """Every worker runs the reconcile loop; the Redis lock lets one pass run at a time."""
    loops: list[ReconcileLoop] = []

    def start(sender: Any = None, **_: Any) -> None:
        if not _ours(app, sender):
            return
        rt = Runtime(app.settings)  # its own clients: the loop lives in the main process
        loop = ReconcileLoop(
            make_reconciler(rt, make_publisher(app)),
            redis_lock(rt.redis),
            wake_s=app.settings.reconcile.wake_s,
            wake_lock=redis_lock(rt.redis, WAKE_LOCK_KEY),
        )
        loops.append(loop)
        loop.start()

    def stop(sender: Any = None, **_: Any) -> None:
        if _ours(app, sender):
            for loop in loops:
                loop.stop()

    signals.worker_ready.connect(start, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)


def _connect_runtime_signals(app: ServiceCelery) -> None:
    def on_process_init(**_: Any) -> None:
        app.runtime.build_all()  # in the child, after the fork

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
        if _ours(app, sender) and "prefork" not in str(pool):
            app.runtime.build_all()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if sender is None or _ours(app, sender):
            app.close_runtime()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)


def _ours(app: ServiceCelery, sender: Any) -> bool:
    """Is this signal about a worker of ``app``? (Celery's signals are process-wide: a
    process that built several apps, as tests do, must not start one app's loop for
    another's worker.)"""
    return getattr(sender, "app", None) is app


def worker_app(settings: Settings) -> ServiceCelery:
    """The app a worker runs, however it is started (``runcomfy-worker worker`` or
    ``celery -A worker.app worker``): our JSON logging with secret redaction, the liveness
    heartbeat, and the metrics endpoint once the worker starts."""

    def setup_logging(**_: Any) -> None:
        # Connecting here also tells Celery not to replace this configuration with its own.
        configure_logging(
            settings.worker.log_level,
            json_format=settings.worker.log_json,
            secrets=secret_values(settings),
        )

    def start_metrics(**_: Any) -> None:
        start_metrics_server(settings.worker.metrics_port, app.runtime.redis)

    setup_logging()
    app = create_app(settings)
    signals.setup_logging.connect(setup_logging, weak=False)
    if settings.worker.heartbeat_file:
        install_heartbeat(app, settings.worker.heartbeat_file)
    if settings.worker.metrics_port:
        signals.worker_init.connect(start_metrics, weak=False)
    return app


def check_worker_settings(settings: Settings) -> None:
    """What a worker cannot run without (a producer can): ConfigError naming each variable."""
    problems = []
    if not settings.webhook.secret:
        problems.append("WEBHOOK_SECRET: required by a worker (it signs every webhook)")
    if settings.runcomfy.api_token is None or not settings.runcomfy.api_token.get_secret_value():
        problems.append("RUNCOMFY_API_TOKEN: required by a worker (it calls RunComfy)")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def check_redis_eviction(client: redis.Redis, *, allowed: bool) -> None:
    """Refuse a Redis that may evict keys: an evicted job record, queue or ``unacked`` hash
    is a lost job. ConfigError unless ``ALLOW_REDIS_EVICTION=true``; a Redis that cannot be
    asked (down, or CONFIG disabled as on some managed services) is only logged."""
    try:
        answer: dict[Any, Any] = client.config_get("maxmemory-policy")
        policy = as_text(answer.get("maxmemory-policy") or answer.get(b"maxmemory-policy") or "")
    except redis.RedisError as exc:
        log.warning("could not read Redis's maxmemory-policy (%s); make sure it is noeviction", exc)
        return
    if policy and policy != "noeviction":
        if allowed:
            log.warning("Redis maxmemory-policy is %s (ALLOW_REDIS_EVICTION=true)", policy)
            return
        raise ConfigError(
            f"invalid configuration: Redis maxmemory-policy is {policy!r}: evicting job records "
            "or messages loses jobs; set it to noeviction (or ALLOW_REDIS_EVICTION=true)"
        )


def load_worker_settings() -> Settings:
    """Settings for a worker process: the environment, checked for what a worker needs,
    and Redis checked for a policy that would lose jobs."""
    settings = load_settings()
    check_worker_settings(settings)
    client = make_redis(settings.redis, socket_timeout=5, connect_timeout=3)
    try:
        check_redis_eviction(client, allowed=settings.allow_redis_eviction)
    finally:
        client.close()
    return settings


def run_worker(extra: list[str]) -> int:
    """Run ``celery worker`` in this process; returns its exit code (2: bad configuration)."""
    try:
        settings = load_worker_settings()
    except ConfigError as exc:
        click.echo(f"runcomfy-worker: {exc}", err=True)
        return 2
    app = worker_app(settings)
    try:
        # app.start, not app.worker_main: worker_main drops the exit code, so a worker that
        # stopped on an unrecoverable error exited 0 and a restart-on-failure supervisor
        # left it down.
        code: int | None = app.start(argv=worker_argv(extra))
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(code or 0)
