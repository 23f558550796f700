"""Metrics (names, the Redis collector, multiprocess merging) and structured logs."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from api_contracts.messages import ALL_QUEUES, QUEUE_POLL, QUEUE_SUBMIT
from worker import metrics
from worker.constants import INFLIGHT_KEY
from worker.devtools.embedded import free_port, wait_for_port
from worker.logs import (
    JsonFormatter,
    SecretRedactingFilter,
    configure_logging,
    current_context,
    log_context,
    redact,
)

# --------------------------------------------------------------------------- metrics

EXPECTED = {
    "JOBS_FINISHED": ("runcomfy_jobs_finished", ("status",)),
    "JOB_ERRORS": ("runcomfy_job_errors", ("code",)),
    "STAGE_SECONDS": ("runcomfy_stage_seconds", ("stage",)),
    "UPSTREAM_CALLS": ("runcomfy_upstream_calls", ("call", "outcome")),
    "STATUS_CALLS_PER_JOB": ("runcomfy_status_calls_per_job", ()),
    "WEBHOOK_ATTEMPTS": ("runcomfy_webhook_attempts", ("outcome",)),
    "AMBIGUOUS_SUBMITS": ("runcomfy_ambiguous_submits", ()),
    "STALE_MESSAGES": ("runcomfy_stale_messages", ("task",)),
    "MALFORMED_MESSAGES": ("runcomfy_malformed_messages", ("task",)),
}


@pytest.mark.parametrize(("attr", "expected"), EXPECTED.items())
def test_metric_names_and_labels(attr: str, expected: tuple[str, tuple[str, ...]]) -> None:
    metric = getattr(metrics, attr)
    name, labels = expected
    assert metric._name == name
    assert tuple(metric._labelnames) == labels


def test_metrics_are_in_the_default_registry() -> None:
    metrics.JOBS_FINISHED.labels("succeeded").inc()
    metrics.STAGE_SECONDS.labels("generation").observe(42)
    text = generate_latest(REGISTRY).decode()
    assert 'runcomfy_jobs_finished_total{status="succeeded"}' in text
    assert 'runcomfy_stage_seconds_bucket{le="3600.0",stage="generation"}' in text


def test_stage_buckets_reach_an_hour() -> None:
    assert max(metrics.STAGE_SECONDS._upper_bounds[:-1]) >= 3600


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a registry as {(name, sorted labels): value}, via the text format."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.integration
def test_job_store_collector_reads_redis(redis_client: redis.Redis) -> None:
    redis_client.zadd(INFLIGHT_KEY, {"job-a": 1.0, "job-b": 2.0, "job-c": 3.0})
    redis_client.rpush(QUEUE_SUBMIT, "m1", "m2")
    redis_client.rpush(QUEUE_POLL, "m3")
    redis_client.hset(metrics.KOMBU_UNACKED_KEY, mapping={"t1": "x", "t2": "x", "t3": "x"})
    registry = CollectorRegistry()
    registry.register(metrics.JobStoreCollector(redis_client))

    got = samples(registry)

    assert got[("runcomfy_metrics_redis_up", ())] == 1
    assert got[("runcomfy_jobs_in_flight", ())] == 3
    assert got[("runcomfy_broker_unacked", ())] == 3
    lengths = {
        dict(labels)["queue"]: value
        for (name, labels), value in got.items()
        if name == "runcomfy_broker_queue_length"
    }
    assert lengths == {q: {QUEUE_SUBMIT: 2, QUEUE_POLL: 1}.get(q, 0) for q in ALL_QUEUES}


def test_job_store_collector_survives_redis_down() -> None:
    # No retries: redis-py's default backoff would make this test take seconds.
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(metrics.JobStoreCollector(client))
    try:
        got = samples(registry)
    finally:
        client.close()
    assert got == {("runcomfy_metrics_redis_up", ()): 0}


@pytest.mark.integration
def test_build_registry_includes_own_metrics_and_collector(redis_client: redis.Redis) -> None:
    registry = metrics.build_registry(redis_client)
    names = {name for name, _ in samples(registry)}
    assert {"runcomfy_jobs_in_flight", "runcomfy_ambiguous_submits_total"} <= names


def test_start_metrics_server_port_zero_is_a_no_op() -> None:
    metrics.start_metrics_server(0)  # would raise if it tried to bind


@pytest.mark.integration
def test_metrics_server_serves_collector(redis_client: redis.Redis) -> None:
    redis_client.zadd(INFLIGHT_KEY, {"job-a": 1.0})
    port = free_port()
    metrics.start_metrics_server(port, redis_client)
    wait_for_port("127.0.0.1", port)
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "runcomfy_jobs_in_flight 1.0" in body
    assert "runcomfy_jobs_finished_total" in body


def test_multiprocess_values_from_forked_children_are_merged(tmp_path: Path) -> None:
    # Multiprocess mode is chosen when prometheus_client is imported: a fresh interpreter.
    multiproc_dir = tmp_path / "prom" / "not-yet-created"
    script = textwrap.dedent(
        """
        import os
        from prometheus_client import generate_latest
        from worker import metrics

        for _ in range(2):  # like prefork: children increment, the parent serves
            pid = os.fork()
            if pid == 0:
                metrics.JOBS_FINISHED.labels("succeeded").inc()
                os._exit(0)
            os.waitpid(pid, 0)
            metrics.mark_process_dead(pid)
        metrics.JOBS_FINISHED.labels("succeeded").inc()
        print(generate_latest(metrics.build_registry()).decode())
        """
    )
    env = {**os.environ, metrics.MULTIPROC_DIR_ENV: str(multiproc_dir)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert 'runcomfy_jobs_finished_total{status="succeeded"} 3.0' in out
    assert len(list(multiproc_dir.glob("counter_*.db"))) == 3


# --------------------------------------------------------------------------- logs


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """configure_logging changes the root logger: put it back for the next test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_is_idempotent_and_writes_json_to_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG")
    configure_logging("INFO")
    logging.getLogger("worker.test").debug("hidden at INFO")
    logging.getLogger("worker.test").info("hello %s", "world")

    lines = json_lines(capsys.readouterr().out)

    assert len(lines) == 1, "a second configure_logging call must replace, not add, the handler"
    (line,) = lines
    assert line["msg"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "worker.test"
    assert str(line["ts"]).endswith("+00:00")


@pytest.mark.usefixtures("restore_root_logger")
def test_context_fields_nest_and_reset(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = logging.getLogger("worker.test")
    with log_context(job_id="job-1", task="runcomfy.poll", request_id=None):
        with log_context(attempt=3):
            assert current_context() == {"job_id": "job-1", "task": "runcomfy.poll", "attempt": 3}
            log.info("inner")
        log.info("outer", extra={"upstream_status": "in_queue"})
    log.info("outside")

    inner, outer, outside = json_lines(capsys.readouterr().out)
    assert inner["job_id"] == "job-1"
    assert inner["task"] == "runcomfy.poll"
    assert inner["attempt"] == 3
    assert "request_id" not in inner, "None fields are left out"
    assert "attempt" not in outer
    assert outer["upstream_status"] == "in_queue"
    assert not {"job_id", "task", "attempt"} & outside.keys()


@pytest.mark.usefixtures("restore_root_logger")
def test_exception_text_is_included(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("worker.test").exception("failed")
    (line,) = json_lines(capsys.readouterr().out)
    assert line["msg"] == "failed"
    assert "ValueError: boom" in str(line["exc"])
    assert "Traceback" in str(line["exc"])


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_shows_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=False)
    with log_context(job_id="job-9"):
        logging.getLogger("worker.test").warning("plain")
    out = capsys.readouterr().out
    assert "WARNING" in out
    assert "plain [job_id=job-9]" in out


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("token=abc123 and abc123", ["abc123"], "token=*** and ***"),
        ("nothing here", ["abc123"], "nothing here"),
        ("empty secrets are ignored", ["", ""], "empty secrets are ignored"),
        ("whsec_QUJD and QUJD", ["QUJD", "whsec_QUJD"], "*** and ***"),
        ("a-b", [], "a-b"),
    ],
)
def test_redact(text: str, secrets: list[str], expected: str) -> None:
    assert redact(text, secrets) == expected


def test_redacting_filter_masks_message_args_exception_and_extras() -> None:
    secret = "sk-live-0123456789"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretRedactingFilter([secret]))
    log = logging.getLogger("worker.test.redact")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)  # independent of whatever the root level is now
    try:
        log.warning("calling with %s", f"Bearer {secret}", extra={"header": secret})
        try:
            raise RuntimeError(f"server echoed {secret}")
        except RuntimeError:
            log.exception("upstream error")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    text = stream.getvalue()
    assert secret not in text
    first, second = json_lines(text)
    assert first["msg"] == "calling with Bearer ***"
    assert first["header"] == "***"
    assert "RuntimeError: server echoed ***" in str(second["exc"])


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_installs_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", secrets=["hunter2-hunter2"])
    logging.getLogger("worker.test").info("password is hunter2-hunter2")
    assert json_lines(capsys.readouterr().out)[0]["msg"] == "password is ***"


def test_celery_per_task_lines_are_quiet_at_info_and_back_at_debug() -> None:
    import logging

    from worker.logs import CELERY_PER_TASK_LOGGERS, PER_CALL_LOGGERS, configure_logging

    assert set(CELERY_PER_TASK_LOGGERS) < set(PER_CALL_LOGGERS)
    assert "httpx" in PER_CALL_LOGGERS
    try:
        configure_logging("INFO", json_format=True)
        assert all(not logging.getLogger(n).isEnabledFor(logging.INFO) for n in PER_CALL_LOGGERS)
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
        assert logging.getLogger("worker.jobs").isEnabledFor(logging.INFO)
        configure_logging("DEBUG", json_format=True)
        assert all(logging.getLogger(n).isEnabledFor(logging.DEBUG) for n in PER_CALL_LOGGERS)
    finally:
        configure_logging("WARNING", json_format=True)
        for name in PER_CALL_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
