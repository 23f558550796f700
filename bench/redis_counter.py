"""Count Redis round trips and commands made by this process, by wrapping redis-py's
``Connection`` (every client in the process goes through it: the job store's and kombu's).

A round trip is one ``send_packed_command`` (a pipeline is one); commands are counted by name,
pipelines' commands each once (``MULTI``/``EXEC`` included). Worker subprocesses get the same
wrapper through ``bench/_inject/sitecustomize.py`` when ``BENCH_REDIS_COUNT_FILE`` is set: a
thread writes the counts to ``<file>.<pid>`` every ``DUMP_INTERVAL_S``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

DUMP_INTERVAL_S = 0.2


class _State:
    """This process's counts (one instance, mutated in place: no ``global``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: Counter[str] = Counter()
        self.round_trips = 0
        self.installed = False


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

    send_packed = AbstractConnection.send_packed_command
    send_command = AbstractConnection.send_command
    pack_commands = AbstractConnection.pack_commands

    def counted_send_packed(self: Any, command: Any, check_health: bool = True) -> Any:
        with _state.lock:
            _state.round_trips += 1
        return send_packed(self, command, check_health)

    def counted_send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            with _state.lock:
                _state.commands[_name(args[0])] += 1
        return send_command(self, *args, **kwargs)

    def counted_pack_commands(self: Any, commands: Any) -> Any:
        commands = list(commands)
        with _state.lock:
            for args in commands:
                if args:
                    _state.commands[_name(args[0])] += 1
        return pack_commands(self, commands)

    AbstractConnection.send_packed_command = counted_send_packed  # type: ignore[method-assign]
    AbstractConnection.send_command = counted_send_command  # type: ignore[method-assign]
    AbstractConnection.pack_commands = counted_pack_commands  # type: ignore[method-assign]
    _state.installed = True


def snapshot() -> dict[str, Any]:
    """Counts so far in this process."""
    with _state.lock:
        return {"round_trips": _state.round_trips, "commands": dict(_state.commands)}


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` for two snapshots."""
    names = set(after["commands"]) | set(before["commands"])
    commands = {
        n: after["commands"].get(n, 0) - before["commands"].get(n, 0) for n in sorted(names)
    }
    return {
        "round_trips": after["round_trips"] - before["round_trips"],
        "commands": {n: c for n, c in commands.items() if c},
    }


def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum of two snapshots (several processes)."""
    names = set(a["commands"]) | set(b["commands"])
    return {
        "round_trips": a["round_trips"] + b["round_trips"],
        "commands": {n: a["commands"].get(n, 0) + b["commands"].get(n, 0) for n in names},
    }


def empty() -> dict[str, Any]:
    """A zero snapshot."""
    return {"round_trips": 0, "commands": {}}


def start_dumping(path: str) -> None:
    """Write this process's counts to ``<path>.<pid>`` periodically (worker subprocesses)."""
    install()

    def loop() -> None:
        target = Path(f"{path}.{os.getpid()}")
        tmp = target.with_suffix(target.suffix + ".tmp")
        while True:
            tmp.write_text(json.dumps(snapshot()))
            os.replace(tmp, target)
            time.sleep(DUMP_INTERVAL_S)

    def restart_in_child() -> None:
        _state.lock = threading.Lock()  # another thread may have held it at the fork
        _state.commands.clear()  # the parent's counts are the parent's; a child starts at 0
        _state.round_trips = 0
        threading.Thread(target=loop, name="bench-redis-counter", daemon=True).start()

    os.register_at_fork(after_in_child=restart_in_child)
    threading.Thread(target=loop, name="bench-redis-counter", daemon=True).start()


def read_dumps(path: str) -> dict[str, Any]:
    """Sum of every ``<path>.<pid>`` written so far (a worker and its pool children)."""
    total = empty()
    folder = Path(path).parent
    for file in folder.glob(Path(path).name + ".*"):
        if file.suffix == ".tmp":
            continue
        try:
            total = add(total, json.loads(file.read_text()))
        except (OSError, ValueError):
            continue
    return total
