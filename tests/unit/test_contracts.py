"""The wire contract against upstream's own schema, and every bad input named in its error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from api_contracts import SIZE_KEY, SIZES, GenerationInput, JobRequest
from api_contracts.inputs import normalise_size, size_dimensions
from api_contracts.schema import SCHEMA_DIR, render, schemas
from api_contracts.upstream import ResultOutput, StatusResponse, SubmitResponse

DATA = Path(__file__).parent.parent / "data"
UPSTREAM = json.loads((DATA / "upstream-input-schema.json").read_text(encoding="utf-8"))
UP = UPSTREAM["properties"]


def test_size_enum_equals_upstream() -> None:
    assert list(SIZES) == UP[SIZE_KEY]["enum"]
    assert SIZE_KEY == "width\u00d7height"


def test_defaults_equal_upstream() -> None:
    inp = GenerationInput(prompt="x")
    assert inp.size == UP[SIZE_KEY]["default"]
    assert inp.scale == UP["scale"]["default"]
    assert inp.force_single is UP["force_single"]["default"]
    assert UPSTREAM["required"] == ["prompt"]


def test_bounds_equal_upstream() -> None:
    ours = schemas()["JobRequest"]["$defs"]["GenerationInput"]["properties"]
    assert ours["prompt"]["maxLength"] == UP["prompt"]["maxLength"] == 800
    assert ours["scale"]["minimum"] == UP["scale"]["minimum"]
    assert ours["scale"]["maximum"] == UP["scale"]["maximum"]
    assert ours[SIZE_KEY]["enum"] == UP[SIZE_KEY]["enum"]
    assert set(ours) == set(UP)


def test_wire_body_uses_the_upstream_key() -> None:
    body = GenerationInput(prompt="a cat", size="2560x1440").to_upstream()
    assert body == {
        "prompt": "a cat",
        SIZE_KEY: "2560x1440(16:9)",
        "scale": 0.5,
        "force_single": False,
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2048x2048", "2048x2048(1:1)"),
        ("2048x2048(1:1)", "2048x2048(1:1)"),
        ("6198X2656", "6198x2656(21:9)"),
        ("1024\u00d71024", "1024x1024(1:1)"),
        (" 2560x1440(16:9) ", "2560x1440(16:9)"),
    ],
)
def test_size_short_forms(given: str, expected: str) -> None:
    assert normalise_size(given) == expected
    assert GenerationInput(prompt="x", size=given).size == expected
    assert GenerationInput.model_validate({"prompt": "x", SIZE_KEY: given}).size == expected


def test_size_dimensions() -> None:
    assert size_dimensions("6198x2656(21:9)") == (6198, 2656)
    assert GenerationInput(prompt="x", size="4694x3520").dimensions == (4694, 3520)


BAD_INPUTS: list[tuple[dict[str, Any], str, str]] = [
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "at least 1"),
    ({"prompt": "   \n\t"}, "prompt", "whitespace"),
    ({"prompt": "x" * 801}, "prompt", "at most 800"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x", "size": "2048x2049"}, "size", "allowed: 1024x1024(1:1)"),
    ({"prompt": "x", "size": "2048x2048(4:3)"}, "size", "not an allowed size"),
    ({"prompt": "x", "size": 2048}, "size", "must be a string"),
    ({"prompt": "x", "scale": -0.01}, "scale", "greater than or equal to 0"),
    ({"prompt": "x", "scale": 1.01}, "scale", "less than or equal to 1"),
    ({"prompt": "x", "scale": math.nan}, "scale", "finite"),
    ({"prompt": "x", "scale": math.inf}, "scale", "finite"),
    ({"prompt": "x", "scale": True}, "scale", "number"),
    ({"prompt": "x", "scale": "0.5"}, "scale", "number"),
    ({"prompt": "x", "force_single": 1}, "force_single", "boolean"),
    ({"prompt": "x", "force_single": "true"}, "force_single", "boolean"),
    ({"prompt": "x", "seed": 1}, "seed", "Extra inputs"),
]


@pytest.mark.parametrize(("data", "field", "why"), BAD_INPUTS)
def test_bad_input_names_field_and_reason(data: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerationInput.model_validate(data)
    errors = info.value.errors()
    locs = {".".join(str(p) for p in e["loc"]) for e in errors}
    wire_field = SIZE_KEY if field == "size" and "size" not in data else field
    assert field in locs or wire_field in locs, locs
    assert any(why in e["msg"] for e in errors), [e["msg"] for e in errors]


def test_boundary_values_accepted() -> None:
    assert GenerationInput(prompt="x" * 800, scale=0).scale == 0
    assert GenerationInput(prompt="x", scale=1).scale == 1.0
    assert GenerationInput(prompt="x", force_single=True).force_single is True


BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"input": {"prompt": "x"}, "webhook_url": "ftp://a/b"}, "webhook_url", "http"),
    ({"input": {"prompt": "x"}, "webhook_url": "http:///nohost"}, "webhook_url", "host"),
    ({"input": {"prompt": "x"}, "webhook_url": "https://u:p@h/x"}, "webhook_url", "credentials"),
    ({"input": {"prompt": "x"}, "webhook_url": "https://h:99999/x"}, "webhook_url", "port"),
    ({"input": {"prompt": "x"}, "idempotency_key": "has space"}, "idempotency_key", "pattern"),
    ({"input": {"prompt": "x"}, "idempotency_key": "k" * 129}, "idempotency_key", "pattern"),
    ({"input": {"prompt": "x"}, "metadata": {"a": "b" * 5000}}, "metadata", "at most 4096"),
    ({"input": {"prompt": "x"}, "metadata": {"a": 1}}, "metadata.a", "string"),
    ({"input": {"prompt": "x"}, "colour": 1}, "colour", "Extra inputs"),
    ({"input": {"prompt": "x"}, "priority": "urgent"}, "priority", "'high', 'normal' or 'low'"),
    ({"input": {"prompt": "x"}, "tenant": "has space"}, "tenant", "pattern"),
    ({"input": {"prompt": "x"}, "tenant": "t" * 129}, "tenant", "pattern"),
    ({"input": {"prompt": ""}}, "input.prompt", "at least 1"),
]


@pytest.mark.parametrize(("data", "field", "why"), BAD_REQUESTS)
def test_bad_request_names_field(data: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(data)
    errors = info.value.errors()
    assert any(".".join(str(p) for p in e["loc"]) == field for e in errors), errors
    assert any(why in e["msg"] for e in errors), [e["msg"] for e in errors]


def test_good_request_round_trips() -> None:
    req = JobRequest.model_validate(
        {
            "input": {"prompt": "hello", SIZE_KEY: "1024x1024(1:1)", "force_single": True},
            "webhook_url": "https://example.com/hook",
            "idempotency_key": "order-42:v1",
            "metadata": {"order": "42"},
        }
    )
    wire = req.model_dump(mode="json", by_alias=True)
    assert wire["input"][SIZE_KEY] == "1024x1024(1:1)"
    assert JobRequest.model_validate(wire) == req


def test_upstream_models_tolerate_extra_fields_and_refuse_unknown_status() -> None:
    sub = SubmitResponse.model_validate({"request_id": "r1", "status_url": "u", "new": 1})
    assert sub.request_id == "r1"
    st = StatusResponse.model_validate({"status": "in_queue", "queue_position": 3, "eta": 9})
    assert st.queue_position == 3
    with pytest.raises(ValidationError):
        StatusResponse.model_validate({"status": "exploded"})


def test_result_output_normalised_in_order() -> None:
    out = ResultOutput.model_validate(
        {"image": "i0", "images": ["i1", "i2"], "video": "v0", "videos": ["v1"]}
    )
    assert out.media() == [
        ("image", "i0"),
        ("image", "i1"),
        ("image", "i2"),
        ("video", "v0"),
        ("video", "v1"),
    ]
    assert ResultOutput.model_validate({}).media() == []


def test_committed_schemas_match_models() -> None:
    for name, schema in schemas().items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        assert path.exists(), f"{path} missing: run `runcomfy-worker schema --write`"
        assert path.read_text(encoding="utf-8") == render(schema), (
            f"{path.name} is out of date: run `runcomfy-worker schema --write`"
        )
