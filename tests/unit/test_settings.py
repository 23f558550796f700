"""Settings come from the contract's environment names; bad values name the variable."""

from __future__ import annotations

import os
from typing import Any

import pytest

from worker import settings as settings_module
from worker.errors import ConfigError
from worker.settings import (
    DEFAULT_MODEL_ID,
    DEFAULT_RUNCOMFY_BASE_URL,
    DEFAULT_WEBHOOK_RETRY_SCHEDULE,
    load_settings,
)

ALL_VARS = [
    "REDIS_URL", "RUNCOMFY_BASE_URL", "RUNCOMFY_API_TOKEN", "RUNCOMFY_MODEL_ID", "S3_BUCKET",
    "S3_PREFIX", "S3_ENDPOINT_URL", "WEBHOOK_SECRET", "ALLOW_PRIVATE_NETWORKS",
    "WEBHOOK_RETRY_SCHEDULE", "POLL_INITIAL_DELAY_S", "POLL_MIN_INTERVAL_S",
    "POLL_MAX_INTERVAL_S", "JOB_DEADLINE_S", "JOB_TTL_S", "BROKER_VISIBILITY_TIMEOUT_S",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    s = load_settings()
    assert s.runcomfy.base_url == DEFAULT_RUNCOMFY_BASE_URL == "https://model-api.runcomfy.net"
    assert s.runcomfy.model_id == DEFAULT_MODEL_ID == "bytedance/dreamina-4-0/text-to-image"
    assert s.allow_private_networks is False
    assert s.webhook.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert s.job.deadline_s == 1800
    assert s.job.ttl_s == 7 * 24 * 3600
    assert s.broker.visibility_timeout_s > s.max_countdown_s * 2
    assert s.poll.initial_delay_s == 1.0


def test_every_contract_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "REDIS_URL": "redis://r:1/2",
        "RUNCOMFY_BASE_URL": "http://emu:8188/",
        "RUNCOMFY_API_TOKEN": "tok-sentinel",
        "RUNCOMFY_MODEL_ID": "a/b/c",
        "S3_BUCKET": "my-bucket",
        "S3_PREFIX": "p/",
        "S3_ENDPOINT_URL": "http://minio:9000",
        "WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw,whsec_dGVzdA==",
        "ALLOW_PRIVATE_NETWORKS": "true",
        "WEBHOOK_RETRY_SCHEDULE": "1, 2,3.5",
        "POLL_INITIAL_DELAY_S": "0.5",
        "POLL_MIN_INTERVAL_S": "0.25",
        "POLL_MAX_INTERVAL_S": "9",
        "JOB_DEADLINE_S": "60",
        "JOB_TTL_S": "120",
        "BROKER_VISIBILITY_TIMEOUT_S": "300",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert s.redis.url == "redis://r:1/2"
    assert s.runcomfy.base_url == "http://emu:8188"
    assert s.runcomfy.api_token is not None
    assert s.runcomfy.api_token.get_secret_value() == "tok-sentinel"
    assert "tok-sentinel" not in repr(s) and "tok-sentinel" not in str(s)
    assert s.runcomfy.model_id == "a/b/c"
    assert (s.s3.bucket, s.s3.prefix, s.s3.endpoint_url) == ("my-bucket", "p/", "http://minio:9000")
    assert [x.get_secret_value() for x in s.webhook.secret] == [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_dGVzdA==",
    ]
    assert "MfKQ9r8" not in repr(s)
    assert s.allow_private_networks is True
    assert s.webhook.retry_schedule == (1.0, 2.0, 3.5)
    assert (s.poll.initial_delay_s, s.poll.min_interval_s, s.poll.max_interval_s) == (0.5, 0.25, 9)
    assert (s.job.deadline_s, s.job.ttl_s) == (60, 120)
    assert s.broker.visibility_timeout_s == 300
    assert s.max_countdown_s == 75


BAD_VALUES = [
    ("REDIS_URL", "http://nope"),
    ("RUNCOMFY_BASE_URL", "model-api.runcomfy.net"),
    ("S3_BUCKET", "Bad_Bucket"),
    ("WEBHOOK_SECRET", "not-base64!"),
    ("ALLOW_PRIVATE_NETWORKS", "perhaps"),
    ("WEBHOOK_RETRY_SCHEDULE", "5,-1"),
    ("WEBHOOK_RETRY_SCHEDULE", "5,soon"),
    ("POLL_INITIAL_DELAY_S", "-1"),
    ("POLL_MIN_INTERVAL_S", "0"),
    ("POLL_MAX_INTERVAL_S", "abc"),
    ("JOB_DEADLINE_S", "0"),
    ("JOB_TTL_S", "forever"),
    ("BROKER_VISIBILITY_TIMEOUT_S", "1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)


def test_min_above_max_interval_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_MIN_INTERVAL_S", "10")
    monkeypatch.setenv("POLL_MAX_INTERVAL_S", "5")
    with pytest.raises(ConfigError, match="POLL_"):
        load_settings()


def test_environ_mapping_is_read_instead_of_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("S3_BUCKET", "process-bucket")
    before = dict(__import__("os").environ)
    s = load_settings(environ={"S3_BUCKET": "given-bucket", "JOB_TTL_S": "60"})
    assert (s.s3.bucket, s.job.ttl_s) == ("given-bucket", 60)
    assert dict(__import__("os").environ) == before  # untouched
    with pytest.raises(ConfigError, match="JOB_TTL_S"):
        load_settings(environ={"JOB_TTL_S": "soon"})
    assert dict(__import__("os").environ) == before


def test_mapping_wins_over_conflicting_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each of these would change a setting (or fail the load) if os.environ were read.
    monkeypatch.setenv("S3_BUCKET", "process-bucket")
    monkeypatch.setenv("JOB_TTL_S", "forever")
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE", "1,2")
    monkeypatch.setenv("ALLOW_PRIVATE_NETWORKS", "true")
    s = load_settings(
        environ={"s3_bucket": "given-bucket", "Poll_Max_Interval_S": "9", "JOB_DEADLINE_S": "60"}
    )
    assert s.s3.bucket == "given-bucket"
    assert s.poll.max_interval_s == 9
    assert s.job.deadline_s == 60
    assert s.job.ttl_s == 7 * 24 * 3600
    assert s.webhook.retry_schedule == DEFAULT_WEBHOOK_RETRY_SCHEDULE
    assert s.allow_private_networks is False


def test_loading_from_a_mapping_never_touches_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCOMFY_TEST_SENTINEL", "untouched")
    before = dict(os.environ)
    given = {
        "S3_BUCKET": "given-bucket",
        "WEBHOOK_RETRY_SCHEDULE": "1,2",
        "ONLY_IN_THE_MAPPING": "x",
    }
    seen_during_load: list[dict[str, str]] = []
    split_csv = settings_module._split_csv

    def spying_split_csv(value: Any) -> Any:
        # Runs while WebhookSettings validates, i.e. in the middle of load_settings.
        seen_during_load.append(dict(os.environ))
        return split_csv(value)

    monkeypatch.setattr(settings_module, "_split_csv", spying_split_csv)
    s = load_settings(environ=given)
    assert s.webhook.retry_schedule == (1.0, 2.0)
    assert seen_during_load, "the spy did not run during the load"
    for environ in [*seen_during_load, dict(os.environ)]:
        assert environ == before
        assert environ["RUNCOMFY_TEST_SENTINEL"] == "untouched"
        assert not set(given) & set(environ)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_in_the_mapping_gives_the_same_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as from_mapping:
        load_settings(environ={name: value})
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as from_process:
        load_settings()
    assert str(from_mapping.value) == str(from_process.value)
    assert str(from_mapping.value).startswith(f"invalid configuration: {name}: ")


def test_bad_number_in_the_mapping_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"POLL_MAX_INTERVAL_S": "abc"})
    assert str(info.value) == (
        "invalid configuration: POLL_MAX_INTERVAL_S: Input should be a valid number, "
        "unable to parse string as a number"
    )
