"""`response_format` through the API, against real Postgres: a bad one is a 422 naming it on a
native job and fails its line alone in a batch; a good one is stored with the job's sampling
settings as the schema the worker enforces."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from jobs.models import Job
from tests.integration.test_batch_steps import start_batch

PROMPT = {"prompt": "hi", "max_tokens": 4}
CHAT = "/v1/chat/completions"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
GOOD = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}


def post(client: TestClient, headers: dict[str, str], body: Any) -> Any:
    json_headers = {**headers, "Content-Type": "application/json"}
    return client.post("/v1/jobs", content=json.dumps(body), headers=json_headers)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "n"},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": 12}}},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"minimum": "1"}}},
        {"type": "json_schema", "json_schema": {"name": "n"}},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": 1}},
        {"type": "json_object", "schema": SCHEMA},
        {"kind": "json_object"},
        "json_object",
    ],
)
def test_a_bad_response_format_is_422_naming_it(
    client: TestClient, alice: dict[str, str], response_format: Any
) -> None:
    response = post(client, alice, {**PROMPT, "response_format": response_format})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith("response_format")


@pytest.mark.parametrize(
    ("response_format", "stored"),
    [
        (GOOD, json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))),
        ({"type": "json_object"}, '{"type":"object"}'),
        ({"type": "text"}, None),
    ],
)
def test_a_good_response_format_is_stored_as_its_schema(
    client: TestClient,
    alice: dict[str, str],
    session: Session,
    response_format: Any,
    stored: str | None,
) -> None:
    response = post(client, alice, {**PROMPT, "response_format": response_format})
    assert response.status_code == 202, response.text
    job = session.get(Job, response.json()["id"])
    assert job is not None and job.sampling["response_format"] == stored


def chat_line(custom_id: str, **body: Any) -> bytes:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body},
    }
    return json.dumps(line).encode()


def test_a_batch_line_with_a_bad_response_format_fails_alone(
    client: TestClient, alice: dict[str, str]
) -> None:
    lines = [
        chat_line("good", response_format=GOOD),
        chat_line("unknown-type", response_format={"type": "yaml"}),
        chat_line(
            "not-a-schema",
            response_format={**GOOD, "json_schema": {"name": "n", "schema": {"type": 12}}},
        ),
        chat_line("no-schema", response_format={"type": "json_schema"}),
        chat_line("object", response_format={"type": "json_object"}),
    ]
    batch_id = start_batch(client, alice, lines)["id"]
    shown = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert shown["request_counts"] == {"total": 5, "completed": 0, "failed": 3}, shown
    client.post(f"/v1/batches/{batch_id}/cancel", headers=alice)
    ended = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    content = client.get(f"/v1/files/{ended['error_file_id']}/content", headers=alice)
    errors = {
        json.loads(line)["custom_id"]: json.loads(line)["error"]
        for line in content.text.splitlines()
    }
    for number, custom_id in ((2, "unknown-type"), (3, "not-a-schema"), (4, "no-schema")):
        error = errors[custom_id]
        assert error["line"] == number and error["message"].startswith(f"line {number}:")
        assert error["code"] == "invalid_parameter"
        assert error["param"].startswith("body.response_format"), error
    assert {errors[name]["code"] for name in ("good", "object")} == {"batch_cancelled"}
