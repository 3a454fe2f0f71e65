"""`response_format` through the whole stack: a native job with a JSON Schema, decoded by the
real worker, answers JSON that follows it; one whose schema the worker cannot compile fails
alone with `invalid_response_format`."""

import json
from typing import Any

import httpx
import jsonschema
import pytest

from tests import services
from tests.conftest import Stack, create_key

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["ok", "colour", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key(stack.env, 'jules')}"}


def run_job(stack: Stack, headers: dict[str, str], schema: dict[str, Any]) -> dict[str, Any]:
    body = {
        "prompt": "Describe a ball as JSON.",
        "max_tokens": 64,
        "temperature": 1.0,
        "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}},
    }
    made = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=headers)
    assert made.status_code == 202, made.text
    found: dict[str, Any] = {}

    def finished() -> bool:
        url = f"{stack.api_url}/v1/jobs/{made.json()['id']}"
        found.update(httpx.get(url, headers=headers).json())
        return found["status"] in {"succeeded", "failed", "cancelled"}

    services.wait_for(finished, 90, "the job to finish", interval=0.1)
    return found


def test_a_native_job_answers_json_that_follows_its_schema(
    stack: Stack, headers: dict[str, str]
) -> None:
    job = run_job(stack, headers, SCHEMA)
    assert job["status"] == "succeeded" and job["finish_reason"] == "stop", job
    jsonschema.validate(json.loads(job["result"]["response"]), SCHEMA)


def test_a_schema_the_worker_cannot_compile_fails_its_job(
    stack: Stack, headers: dict[str, str]
) -> None:
    job = run_job(stack, headers, {"$ref": "https://example.com/elsewhere.json"})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_response_format", job
