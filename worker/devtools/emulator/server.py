"""The emulator over HTTP/1.1 with keep-alive: a small asyncio server on its own event-loop thread.

Chosen by measurement on two cores with httpx clients in other processes: the stdlib
ThreadingHTTPServer (keep-alive, TCP_NODELAY) used ~180 µs of CPU per status call, mostly
its header parser and GIL hand-offs between connection threads; this server uses ~60 µs,
leaving the CPU to the clients. The HTTP subset is small on purpose: request line, headers,
``Content-Length`` or chunked bodies, ``Expect: 100-continue``, keep-alive and ``HEAD``.
The behaviour lives in :class:`~worker.devtools.emulator.core.Emulator`; this module only
moves bytes and acts out the delays, truncations and resets a reply asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final, Self

from worker.devtools.embedded import ManagedService
from worker.devtools.emulator.config import EmulatorConfig
from worker.devtools.emulator.core import Emulator, Reply, blob_size, error_reply
from worker.devtools.emulator.faults import FaultRule
from worker.devtools.emulator.png import Blob

logger = logging.getLogger("worker.devtools.emulator")

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_REQUEST_BODY: Final = 16 << 20
IDLE_TIMEOUT_S: Final = 120.0
_START_TIMEOUT_S: Final = 10.0


class _BadRequest(Exception):
    """The request cannot be parsed; answer with ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased) from the bytes up to the blank line."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400, f"bad request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, f"unsupported protocol {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, f"bad header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    return method, target, version, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        total = 0
        while True:
            line = await reader.readline()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "bad chunked body") from None
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_REQUEST_BODY:
                raise _BadRequest(413, "request body too large")
            parts.append(await reader.readexactly(size))
            await reader.readline()
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        raise _BadRequest(400, "bad Content-Length") from None
    if length < 0 or length > MAX_REQUEST_BODY:
        raise _BadRequest(413, "request body too large")
    return await reader.readexactly(length) if length else b""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _head_bytes(reply: Reply, size: int, keep_alive: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {reply.status} {_phrase(reply.status)}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {size}",
        "Server: runcomfy-emulator",
    ]
    lines.extend(f"{name}: {value}" for name, value in reply.headers.items())
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Reset the connection: SO_LINGER 0 makes the close send a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _HTTPFrontend:
    """Accepts connections and speaks HTTP/1.1 for one Emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve requests on one connection until it closes, errs or asks to close."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        aborted = False
        try:
            aborted = await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # close_all() cancelled us: end quietly. On Python < 3.12 a cancelled handler
            # task makes asyncio's start_server callback log a CancelledError traceback
            # (CPython gh-113538).
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            if not aborted:
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer requests until the connection is to close; True if a reply reset it."""
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, TimeoutError):
                return False
            except asyncio.LimitOverrunError:
                await self._send_error(writer, _BadRequest(431, "request head too large"))
                return False
            try:
                keep_alive = await self._one_request(reader, writer, head)
            except _BadRequest as exc:
                await self._send_error(writer, exc)
                return False
            if keep_alive is None:
                return True
            if not keep_alive:
                return False

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> bool | None:
        """Answer one request; True to keep the connection, False to close, None if reset."""
        started = time.perf_counter()
        method, target, version, headers = _parse_head(head)
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers)
        authorization = headers.get("authorization")
        if target.startswith("/files/"):
            # The first file of a size takes tens of milliseconds to build: not on the loop.
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(
                None, self.emulator.handle, method, target, authorization, body
            )
        else:
            reply = self.emulator.handle(method, target, authorization, body)
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        sent = await self._write(writer, reply, keep_alive, send_body=method != "HEAD")
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s %s -> %s%s (%.1f ms)",
                method,
                target.split("?", 1)[0],
                reply.status,
                "" if sent else " reset",
                (time.perf_counter() - started) * 1000,
            )
        return keep_alive if sent else None

    async def _write(
        self, writer: asyncio.StreamWriter, reply: Reply, keep_alive: bool, *, send_body: bool
    ) -> bool:
        """Send the reply, or act out its reset; False if the connection was reset."""
        if reply.reset_after == 0:
            _abort(writer)
            return False
        size = blob_size(reply)
        if reply.body_limit is not None:
            size = min(size, reply.body_limit)
        head = _head_bytes(reply, size, keep_alive)
        if isinstance(reply.body, bytes) and reply.reset_after is None:
            writer.write(head + reply.body[:size] if send_body else head)
            await writer.drain()
            return True
        writer.write(head)
        if send_body:
            limit = size if reply.reset_after is None else min(size, reply.reset_after)
            body = reply.body if isinstance(reply.body, Blob) else Blob((reply.body,))
            for chunk in body.chunks():
                if limit <= 0:
                    break
                writer.write(chunk[:limit])
                limit -= len(chunk)
                await writer.drain()
        await writer.drain()
        if reply.reset_after is not None:
            _abort(writer)
            return False
        return True

    async def _send_error(self, writer: asyncio.StreamWriter, exc: _BadRequest) -> None:
        reply = error_reply(exc.status, "bad_request", str(exc))
        with contextlib.suppress(ConnectionError):
            await self._write(writer, reply, keep_alive=False, send_body=True)

    async def close_all(self) -> None:
        """Abort every open connection and wait for their handlers to finish."""
        self._closing = True
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class EmulatorServer(ManagedService):
    """The RunComfy emulator over HTTP on ``host:port`` (0: a free port), in a background thread.

    ``clock`` (seconds, monotonic) drives queue times, limits and expiry; tests may pass a
    fake one to move time by hand.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or EmulatorConfig()
        self._host = host
        self._port = port
        self._clock = clock
        self._emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _open(self) -> tuple[asyncio.Server, _HTTPFrontend]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        self._emulator = Emulator(self._config, self.base_url, clock=self._clock)
        frontend = _HTTPFrontend(self._emulator)
        server = await asyncio.start_server(
            frontend.handle_connection,
            sock=sock,
            limit=MAX_HEAD_BYTES,
            backlog=512,
            start_serving=False,
        )
        await server.start_serving()
        logger.info("RunComfy emulator listening on %s", self.base_url)
        return server, frontend

    @staticmethod
    async def _shut(server: asyncio.Server, frontend: _HTTPFrontend) -> None:
        server.close()
        await frontend.close_all()
        await server.wait_closed()

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event, box: list[Any]) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                server, frontend = loop.run_until_complete(self._open())
            except BaseException as exc:
                box.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shut(server, frontend))
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def start(self) -> Self:
        """Bind and serve in a background thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        box: list[Any] = []
        thread = threading.Thread(
            target=self._run, args=(loop, ready, box), name="runcomfy-emulator", daemon=True
        )
        thread.start()
        if not ready.wait(_START_TIMEOUT_S):
            raise TimeoutError("emulator did not start")
        if box:
            thread.join()
            raise box[0]
        self._loop, self._thread = loop, thread
        return self

    def close(self) -> None:
        """Stop serving and end every open connection."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop = self._thread = None

    def serve_forever(self) -> None:
        """Bind and serve in this thread until SIGINT/SIGTERM (or Ctrl-C), then close."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server, frontend = loop.run_until_complete(self._open())
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signum, loop.stop)
            # Where signal handlers cannot be installed, Ctrl-C arrives as KeyboardInterrupt.
            with contextlib.suppress(KeyboardInterrupt):
                loop.run_forever()
            logger.info("RunComfy emulator stopping")
            loop.run_until_complete(self._shut(server, frontend))
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    @property
    def emulator(self) -> Emulator:
        """The HTTP-independent core (started servers only)."""
        if self._emulator is None:
            raise RuntimeError("emulator not started")
        return self._emulator

    @property
    def port(self) -> int:
        """The TCP port (the real one once started with port 0)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of this server."""
        return f"http://{_url_host(self._host)}:{self._port}"

    @property
    def config(self) -> EmulatorConfig:
        """The configuration in force."""
        return self._emulator.config if self._emulator is not None else self._config

    def counters(self) -> dict[str, Any]:
        """Same as ``GET /_emulator/counters``."""
        return self.emulator.counters()

    def reset(self) -> None:
        """Same as ``POST /_emulator/reset``."""
        self.emulator.reset()

    def set_faults(
        self,
        rules: list[FaultRule],
        rates: dict[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        """Same as ``POST /_emulator/faults``: replace rules (and rates / seed when given)."""
        self.emulator.set_faults(rules, rates, seed)

    def update_config(self, **changes: Any) -> EmulatorConfig:
        """Same as ``POST /_emulator/config``; returns the new configuration."""
        return self.emulator.update_config(**changes)

    @property
    def balance(self) -> float | None:
        """The account balance now (None: unlimited); same as ``GET /_emulator/balance``."""
        return self.emulator.balance

    def top_up(self, amount: float) -> float:
        """Same as ``POST /_emulator/balance {"add": amount}``; returns the new balance."""
        return self.emulator.top_up(amount)

    def set_balance(self, value: float | None) -> float | None:
        """Same as ``POST /_emulator/balance {"set": value}`` (None: unlimited)."""
        return self.emulator.set_balance(value)


def serve_forever(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8188
) -> None:
    """Run the emulator in the foreground until Ctrl-C or SIGTERM (the CLI's entry point)."""
    EmulatorServer(config, host, port).serve_forever()
