"""Count Redis round trips made by this process, by kind, by wrapping redis-py's connection
class (every client in the process goes through it: the job store's and kombu's).

A round trip is one ``send_packed_command``. Its kind is the command's name (``HGETALL``,
``EVALSHA`` …) or, for a pipeline, the commands it carries (``MULTI ZADD HSET EXEC``): one
round trip however many commands. Worker subprocesses get the same wrapper through
``bench/_inject/sitecustomize.py`` when ``BENCH_REDIS_COUNT_FILE`` is set: a thread writes the
counts to ``<file>.<pid>`` every ``DUMP_INTERVAL_S`` (pool children write their own file).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

DUMP_INTERVAL_S = 0.2


class _State:
    """This process's counts (one instance, mutated in place)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds: Counter[str] = Counter()
        self.installed = False
        self.pending = threading.local()  # the kind of the round trip about to be sent


_state = _State()


def _name(arg: Any) -> str:
    if isinstance(arg, bytes):
        return arg.decode(errors="replace").upper()
    return str(arg).upper()


def install() -> None:
    """Wrap redis-py's connection class (idempotent)."""
    if _state.installed:
        return
    from redis.connection import AbstractConnection

    # redis-py leaves these unannotated: typed here as what they are, plain callables.
    send_packed: Callable[..., Any] = AbstractConnection.send_packed_command
    send_command: Callable[..., Any] = AbstractConnection.send_command
    pack_commands: Callable[..., Any] = AbstractConnection.pack_commands

    def counted_send_packed(self: Any, command: Any, check_health: bool = True) -> Any:
        kind = getattr(_state.pending, "kind", None) or "?"
        _state.pending.kind = None
        with _state.lock:
            _state.kinds[kind] += 1
        return send_packed(self, command, check_health)

    def counted_send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        _state.pending.kind = _name(args[0]) if args else "?"
        return send_command(self, *args, **kwargs)

    def counted_pack_commands(self: Any, commands: Any) -> Any:
        commands = list(commands)
        _state.pending.kind = " ".join(_name(args[0]) for args in commands if args)
        return pack_commands(self, commands)

    AbstractConnection.send_packed_command = counted_send_packed  # type: ignore[method-assign]
    AbstractConnection.send_command = counted_send_command  # type: ignore[method-assign]
    AbstractConnection.pack_commands = counted_pack_commands  # type: ignore[method-assign]
    _state.installed = True


def snapshot() -> dict[str, int]:
    """Round trips so far in this process, by kind."""
    with _state.lock:
        return dict(_state.kinds)


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """``after - before`` for two snapshots (kinds that did not change are left out)."""
    out = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in after.keys() | before}
    return {kind: n for kind, n in out.items() if n}


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Sum of two snapshots (several processes)."""
    return {kind: a.get(kind, 0) + b.get(kind, 0) for kind in a.keys() | b}


def start_dumping(path: str) -> None:
    """Count, and write this process's counts to ``<path>.<pid>`` periodically."""
    install()

    def loop() -> None:
        target = Path(f"{path}.{os.getpid()}")
        tmp = target.with_name(target.name + ".tmp")
        while True:
            tmp.write_text(json.dumps(snapshot()))
            os.replace(tmp, target)
            time.sleep(DUMP_INTERVAL_S)

    def restart_in_child() -> None:
        _state.lock = threading.Lock()  # another thread may have held it at the fork
        _state.kinds.clear()  # the parent's counts are the parent's; a child starts at 0
        threading.Thread(target=loop, name="bench-redis-counter", daemon=True).start()

    os.register_at_fork(after_in_child=restart_in_child)
    threading.Thread(target=loop, name="bench-redis-counter", daemon=True).start()


def read_dumps(path: str) -> dict[str, int]:
    """Sum of every ``<path>.<pid>`` written so far (a worker and its pool children)."""
    total: dict[str, int] = {}
    folder = Path(path).parent
    for file in folder.glob(Path(path).name + ".*"):
        if file.name.endswith(".tmp"):
            continue
        try:
            total = add(total, json.loads(file.read_text()))
        except (OSError, ValueError):
            continue
    return total
