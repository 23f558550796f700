"""The README cannot rot: its configuration table is checked against the settings classes,
its error and state lists against the contracts, its links against the tree, and every
command in a fenced ``sh``/``console`` block is either run here or named with the test (or
CI step) that exercises it.

``python -m tests.unit.test_readme`` prints the configuration table's first two columns as
the settings define them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from api_contracts.errors import ErrorCode
from api_contracts.jobs import JobStatus
from worker.cli import main
from worker.devtools.embedded import free_port
from worker.settings import _SECTIONS, _TopLevel

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: Commands run by this test: command -> expected exit code. Output lines shown under a
#: command in a ``console`` block must appear in what it prints.
RUN_HERE: dict[str, int] = {
    "runcomfy-worker --help": 0,
    "runcomfy-worker submit --help": 0,
    "runcomfy-worker schema --check": 0,
    'runcomfy-worker submit --prompt "a cube" --size 9x9': 2,
}

#: Commands too costly (or needing services) to run here, with what exercises them:
#: ``path::test_name`` (the test must exist) or ``file:<path>`` (CI script that runs it).
EXERCISED_ELSEWHERE: dict[str, str] = {
    "make demo": "tests/e2e/test_demo_e2e.py::test_demo_runs_everything_and_cleans_up",
    "make test": "file:.ci/run",
    'runcomfy-worker submit --prompt "a lighthouse at dusk" --size 2048x2048 '
    "--webhook-url https://example.com/hooks/runcomfy --metadata order=42 --wait": (
        "tests/e2e/test_client_cli_e2e.py::test_cli_submit_wait_json_is_exactly_a_job_record"
    ),
    "runcomfy-worker status 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c --json": (
        "tests/e2e/test_client_cli_e2e.py::test_cli_submit_then_status_and_wait"
    ),
    "runcomfy-worker wait 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c": (
        "tests/e2e/test_client_cli_e2e.py::test_cli_submit_then_status_and_wait"
    ),
    "runcomfy-worker cancel 6f1c0d2e8a4b4f0e9d8c7b6a5f4e3d2c": (
        "tests/e2e/test_client_cli_e2e.py::"
        "test_cancel_queued_never_reaches_upstream_and_sends_job_cancelled"
    ),
    'python examples/python_raw_producer.py --prompt "a lighthouse at dusk" '
    "--webhook-url https://example.com/hooks/runcomfy": (
        "tests/e2e/test_raw_producer_e2e.py::"
        "test_raw_python_producer_job_completes_and_example_receiver_verifies"
    ),
    # `npm install` needs the network; the test runs the example's message builder with node
    # (when installed) and has a real worker run the job it describes.
    'cd examples/node_producer && npm install && node index.mjs "a lighthouse at dusk"': (
        "tests/e2e/test_raw_producer_e2e.py::test_node_producer_builds_a_message_the_worker_runs"
    ),
}

#: Variables in the configuration table that are not service settings (none today).
EXTRA_TABLE_VARIABLES: frozenset[str] = frozenset()


# ====================================================================== parsing
@dataclass
class Command:
    """One command from a fenced block, with the output lines shown under it."""

    text: str
    shown_output: list[str] = field(default_factory=list)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(text: str) -> list[Command]:
    """Commands of every ``sh`` block (each line) and ``console`` block (``$ `` lines)."""
    found: list[Command] = []
    for lang, body in fenced_blocks(text):
        if lang == "sh":
            joined = re.sub(r"\\\n\s*", "", body)
            found.extend(
                Command(line.strip())
                for line in joined.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            )
        elif lang == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    found.append(Command(line[2:].strip()))
                elif line.strip() and found:
                    found[-1].shown_output.append(line)
    return found


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match[1]


def table_rows(text: str) -> list[list[str]]:
    """Cells of the data rows of every Markdown table in ``text``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:] if rows else rows  # drop the header


def unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


# ====================================================================== the settings table
def render_default(value: Any) -> str:
    """How the README writes a default."""
    if value is None or value == []:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def settings_variables() -> dict[str, str]:
    """Every environment variable of worker/settings.py with its default, as the README shows it."""
    found: dict[str, str] = {}
    classes: list[Any] = [*_SECTIONS.values(), _TopLevel]
    for cls in classes:
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            found[f"{cls.env_prefix_name}{name}".upper()] = render_default(default)
    return found


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = table_rows(section(readme(), "Configuration"))
    documented = {unquote(row[0]): unquote(row[1]) for row in rows}
    expected = settings_variables()
    missing = sorted(set(expected) - set(documented))
    assert not missing, f"add to the README table: {missing}"
    unknown = sorted(set(documented) - set(expected) - EXTRA_TABLE_VARIABLES)
    assert not unknown, f"not settings: {unknown}"
    wrong = {k: (documented[k], v) for k, v in expected.items() if documented[k] != v}
    assert not wrong, f"README default vs settings default: {wrong}"
    assert all(len(row) == 3 and row[2] for row in rows), "every variable needs a meaning"


def test_every_error_code_and_state_is_documented() -> None:
    rows = table_rows(section(readme(), "Job states and errors"))
    assert [unquote(row[0]) for row in rows] == [code.value for code in ErrorCode]
    states = section(readme(), "Job states and errors")
    for status in JobStatus:
        assert f"`{status.value}`" in states, status


def test_python_blocks_compile() -> None:
    blocks = [body for lang, body in fenced_blocks(readme()) if lang == "python"]
    assert blocks
    for body in blocks:
        compile(body, "README.md", "exec")


def test_raw_message_block_has_the_examples_fields() -> None:
    block = next(body for lang, body in fenced_blocks(readme()) if lang == "json")
    documented = json.loads(block)
    spec = importlib.util.spec_from_file_location(
        "readme_raw", ROOT / "examples/python_raw_producer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = module.build_message("j1", {"input": {"prompt": "a cube"}})
    assert set(documented) == set(real)
    assert set(documented["headers"]) == set(real["headers"])
    assert set(documented["properties"]) == set(real["properties"])
    for part in ("headers", "properties"):
        for key, value in documented[part].items():
            if not (isinstance(value, str) and value.startswith("<")):  # placeholders
                assert real[part][key] == value, (part, key)


def test_relative_links_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", readme()):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_quick_start_is_exactly_two_commands() -> None:
    assert [c.text for c in commands(section(readme(), "Quick start"))] == [
        "make demo",
        "make test",
    ]


# ====================================================================== every command
def test_every_command_is_run_here_or_exercised_elsewhere() -> None:
    found = [c.text for c in commands(readme())]
    unaccounted = [c for c in found if c not in RUN_HERE and c not in EXERCISED_ELSEWHERE]
    assert not unaccounted, (
        f"run these in this test or name where they are exercised: {unaccounted}"
    )
    stale = [c for c in [*RUN_HERE, *EXERCISED_ELSEWHERE] if c not in found]
    assert not stale, f"no longer in the README: {stale}"


@pytest.mark.parametrize("reference", sorted(set(EXERCISED_ELSEWHERE.values())))
def test_references_exist(reference: str) -> None:
    if reference.startswith("file:"):
        path = ROOT / reference.removeprefix("file:")
        command = next(c for c, r in EXERCISED_ELSEWHERE.items() if r == reference)
        assert command in path.read_text(encoding="utf-8").splitlines(), (command, path)
        return
    file, _, name = reference.partition("::")
    assert f"def {name}(" in (ROOT / file).read_text(encoding="utf-8"), reference


def test_make_demo_runs_the_demo_command() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/runcomfy-worker demo$", makefile, re.M)


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_cheap_commands_run(command: str) -> None:
    shown = next(c.shown_output for c in commands(readme()) if c.text == command)
    argv = shlex.split(command)
    assert argv[0] == "runcomfy-worker"
    # Nothing listens there: these commands must not need Redis.
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = CliRunner(env=env).invoke(main, argv[1:], catch_exceptions=False)
    assert result.exit_code == RUN_HERE[command], result.output
    for line in shown:
        assert line in result.output.splitlines(), line


if __name__ == "__main__":
    for name, default in settings_variables().items():
        sys.stdout.write(f"| `{name}` | {default if default == '(none)' else f'`{default}`'} |\n")
