"""The tree keeps its shape: producers stay light, errors live in one module, Lua scripts
document themselves."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "worker"


@pytest.mark.parametrize("module", ["worker.producer.client", "worker.producer.producer"])
def test_producers_never_import_steps_tasks_or_boto3(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = ('worker.jobs.steps', 'worker.queueing.tasks', 'worker.queueing.run', 'boto3')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def _error_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and (node.name.endswith(("Error", "Exception")))
        and not node.name.startswith("_")
    ]


def test_every_public_error_class_is_defined_in_worker_errors() -> None:
    elsewhere = {
        str(path.relative_to(ROOT)): names
        for path in WORKER.rglob("*.py")
        if path.name != "errors.py" and "devtools" not in path.parts
        if (names := _error_classes(path))
    }
    assert elsewhere == {}
    assert "NotCancellableError" in _error_classes(WORKER / "errors.py")


def test_the_error_tree_is_drawn_once() -> None:
    drawings = [
        str(path.relative_to(ROOT))
        for path in WORKER.rglob("*.py")
        if "└── " in path.read_text(encoding="utf-8") and "ServiceError" in path.read_text()
    ]
    assert drawings == ["worker/errors.py"]


SCRIPTS = sorted((WORKER / "jobs" / "scripts").glob("*.lua"))


def test_there_are_lua_scripts() -> None:
    assert [p.name for p in SCRIPTS] == [
        "admit.lua",
        "bucket.lua",
        "check.lua",
        "claim.lua",
        "create.lua",
        "enter.lua",
        "learn.lua",
        "run.lua",
        "unlock.lua",
        "update.lua",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_lua_scripts_document_keys_arguments_and_result(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
    used_keys = set(re.findall(r"KEYS\[(\d+)\]", text.replace(header, "")))
    used_args = set(re.findall(r"ARGV\[(\d+)\]", text.replace(header, "")))
    for index in used_keys:
        assert f"KEYS[{index}]" in header, f"{script.name}: KEYS[{index}] undocumented"
    for index in used_args:
        assert f"ARGV[{index}]" in header, f"{script.name}: ARGV[{index}] undocumented"
    assert "Returns" in header
