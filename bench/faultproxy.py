"""A TCP proxy on 127.0.0.1 that can refuse connections on cue: how the chaos run takes S3
and the webhook receiver "down" without losing their state (moto keeps its objects, the
receiver its deliveries). ``down()`` closes the listener and every open connection, so
clients see refused and reset connections; ``up()`` listens again on the same port."""

from __future__ import annotations

import contextlib
import socket
import threading

from worker.devtools.embedded import free_port


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``down()`` / ``up()`` toggle it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.is_up = False

    def url(self, scheme: str = "http", path: str = "") -> str:
        """``scheme://127.0.0.1:<port><path>``."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def up(self) -> FaultProxy:
        """Listen (again) and forward."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(512)
        self._listener = listener
        self.is_up = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        self.is_up = False
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_now, self._open = self._open, set()
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pair, args=(client, upstream), daemon=True).start()

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)
        client.close()
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes until EOF or an error, then half-close the other side."""
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
