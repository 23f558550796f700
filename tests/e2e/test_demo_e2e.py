"""``runcomfy-worker demo`` as a person runs it: a fresh directory, no settings, one command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from worker.devtools.embedded import EmbeddedRedis, EmbeddedS3
from worker.devtools.emulator import EmulatorConfig, EmulatorServer

pytestmark = pytest.mark.e2e

#: Settings that would point the demo at real services instead of embedded ones.
_SERVICE_VARS = ("REDIS_URL", "RUNCOMFY_", "S3_", "WEBHOOK_", "POLL_", "JOB_", "WORKER_", "AWS_")


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_VARS)}
    env.pop("ALLOW_PRIVATE_NETWORKS", None)
    env["AWS_CONFIG_FILE"] = os.devnull  # never a developer's real AWS profile
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purposes; anything else still runs
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" in status.read_text()


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_demo_runs_everything_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "demo"],
        cwd=tmp_path, env=demo_env(), capture_output=True, text=True, timeout=55, check=False,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "embedded redis-server" in out and "embedded S3 (moto)" in out
    assert "embedded emulator" in out
    for name in ("lighthouse", "harbour", "poster", "panorama", "cats"):
        assert re.search(rf"^{name} +succeeded in [\d.]+s", out, re.M), name
    assert "(6198x2656, 1 image)" in out and "(1024x1024, 2 images)" in out
    assert out.count("webhook verified (job.succeeded") == 5
    assert out.count("sha256 ok") == 6
    assert len(re.findall(r"s3://runcomfy-demo/demo/[0-9a-f]{32}/\d\.png", out)) == 6
    assert re.search(r"wall time +[\d.]+s", out)
    assert "all 5 jobs passed" in out
    files = sorted(p.name for p in (tmp_path / "demo-output").iterdir())
    assert files == [
        "cats-0.png", "cats-1.png", "harbour-0.png", "lighthouse-0.png",
        "panorama-0.png", "poster-0.png",
    ]  # fmt: skip
    for name in files:
        data = (tmp_path / "demo-output" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
    panorama = (tmp_path / "demo-output" / "panorama-0.png").read_bytes()
    assert (int.from_bytes(panorama[16:20], "big"), int.from_bytes(panorama[20:24], "big")) == (
        6198,
        2656,
    )
    worker_pid = int(re.search(r"worker +pid (\d+)", out).group(1))  # type: ignore[union-attr]
    redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert process_gone(worker_pid) and port_closed(redis_port)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_interrupted_stops_everything_it_started(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "demo"],
        cwd=tmp_path, env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("submitted "):
            break
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "interrupted: stopping everything the demo started" in out
    worker_pid = int(re.search(r"worker +pid (\d+)", out).group(1))  # type: ignore[union-attr]
    redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    s3_port = int(re.search(r"moto\) at http://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert process_gone(worker_pid)
    assert port_closed(redis_port) and port_closed(s3_port)


def test_demo_uses_the_services_the_environment_names(
    tmp_path: Path, redis_server: EmbeddedRedis, s3_server: EmbeddedS3
) -> None:
    """REDIS_URL, S3_* and RUNCOMFY_* set: nothing of those is embedded, and they get the work."""
    bucket = "demo-configured"
    s3_server.create_bucket(bucket)
    emulator = EmulatorServer(EmulatorConfig(token="configured-token", queue_s=0.2, run_s=0.5))
    with emulator:
        env = demo_env()
        env.update(s3_server.credentials_env())
        env.update(
            {
                "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/7",
                "S3_BUCKET": bucket,
                "S3_PREFIX": "configured/",
                "RUNCOMFY_BASE_URL": emulator.base_url,
                "RUNCOMFY_API_TOKEN": "configured-token",
                "POLL_INITIAL_DELAY_S": "0.3",
                "POLL_MIN_INTERVAL_S": "0.3",
                "POLL_MAX_INTERVAL_S": "1",
            }
        )
        proc = subprocess.run(
            [sys.executable, "-m", "worker", "demo"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=55, check=False,
        )  # fmt: skip
        out = proc.stdout
        assert proc.returncode == 0, out + proc.stderr
        assert "(REDIS_URL)" in out and "(S3_* settings)" in out and "(RUNCOMFY_* settings)" in out
        assert "embedded" not in out.split("everything up")[0]
        assert "all 5 jobs passed" in out
        assert emulator.counters()["submits"] == 5
    objects = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(
        Bucket=bucket, Prefix="configured/"
    )
    assert objects["KeyCount"] == 6
    assert "configured-token" not in out
