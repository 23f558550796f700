"""JSON Schemas of the wire contract, generated from the models (``runcomfy-worker schema``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from api_contracts.jobs import JobRecord, JobRequest, WebhookEvent
from api_contracts.messages import SubmitMessage

SCHEMA_DIR: Final = Path(__file__).parent / "schemas"
MODELS: Final[dict[str, type[BaseModel]]] = {
    "JobRequest": JobRequest,
    "JobRecord": JobRecord,
    "WebhookEvent": WebhookEvent,
    "SubmitMessage": SubmitMessage,
}


def schemas() -> dict[str, dict[str, Any]]:
    """Name → JSON Schema (wire names, i.e. ``width×height``) of every contract model."""
    return {
        name: model.model_json_schema(by_alias=True, mode="validation")
        for name, model in MODELS.items()
    }


def render(schema: dict[str, Any]) -> str:
    """Stable text form of a schema (sorted keys, UTF-8, trailing newline)."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema as ``<Name>.schema.json``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written
