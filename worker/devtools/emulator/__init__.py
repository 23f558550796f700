"""A local, faithful stand-in for RunComfy's Model API (Dreamina 4.0 text-to-image).

Same paths, Bearer auth and answer shapes as upstream; a time-driven queue with bounded
capacity; real PNG outputs of the requested size served by the emulator itself; seeded,
reproducible fault injection; and private admin endpoints under ``/_emulator/``.

    from worker.devtools.emulator import EmulatorConfig, FaultRule, EmulatorServer

    with EmulatorServer(EmulatorConfig(token="t", queue_s=0.2, run_s=0.5)) as emu:
        emu.base_url   # "http://127.0.0.1:PORT"
        emu.counters()
"""

from worker.devtools.emulator.config import EmulatorConfig
from worker.devtools.emulator.core import Emulator, Reply
from worker.devtools.emulator.faults import CALL_KINDS, FAULT_KINDS, REQUEST_KINDS, FaultRule
from worker.devtools.emulator.server import EmulatorServer, serve_forever

__all__ = [
    "CALL_KINDS",
    "FAULT_KINDS",
    "REQUEST_KINDS",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultRule",
    "Reply",
    "serve_forever",
]
