"""The OpenAPI document says what the API does: who needs a key, and every error it answers,
in the one shape it answers them."""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.openapi import ErrorResponse

ERROR_REF = "#/components/schemas/ErrorResponse"
KEYED = {"401", "503"}
WITH_ID = KEYED | {"404", "422"}
JSON_BODY = KEYED | {"400", "413", "422"}
MULTIPART = JSON_BODY
WAITS = {"409", "502", "504"}
CLOUDFLARE_ERROR_REF = "#/components/schemas/CloudflareErrorResponse"

# Every operation and the error statuses it can answer: written out, so that a change to
# the document in either direction shows here.
ERRORS: dict[tuple[str, str], set[str]] = {
    ("get", "/healthz"): set(),
    ("post", "/v1/jobs"): JSON_BODY | WAITS,
    ("get", "/v1/jobs/{job_id}"): WITH_ID,
    ("post", "/v1/jobs/{job_id}/cancel"): WITH_ID | {"409"},
    ("post", "/v1/loras"): MULTIPART,
    ("get", "/v1/loras"): KEYED,
    ("get", "/v1/loras/{lora_id}"): WITH_ID,
    ("delete", "/v1/loras/{lora_id}"): WITH_ID,
    ("post", "/v1/files"): MULTIPART,
    ("get", "/v1/files"): KEYED | {"422"},
    ("get", "/v1/files/{file_id}"): WITH_ID,
    ("get", "/v1/files/{file_id}/content"): WITH_ID | {"410"},
    ("delete", "/v1/files/{file_id}"): WITH_ID,
    ("post", "/v1/batches"): JSON_BODY | {"404", "410"},
    ("get", "/v1/batches"): KEYED | {"422"},
    ("get", "/v1/batches/{batch_id}"): WITH_ID,
    ("get", "/v1/batches/{batch_id}/output"): WITH_ID,
    ("post", "/v1/batches/{batch_id}/cancel"): WITH_ID | {"409"},
    ("post", "/v1/batches/{batch_id}/retry"): WITH_ID | {"409", "410"},
    ("post", "/v1/schedules"): JSON_BODY | {"404"},
    ("get", "/v1/schedules"): KEYED | {"422"},
    ("get", "/v1/schedules/{schedule_id}"): WITH_ID,
    ("patch", "/v1/schedules/{schedule_id}"): WITH_ID | {"400", "413"},
    ("delete", "/v1/schedules/{schedule_id}"): WITH_ID,
    ("get", "/v1/schedules/{schedule_id}/runs"): WITH_ID,
    ("get", "/v1/webhooks/secret"): KEYED,
    ("post", "/v1/webhooks/secret/rotate"): KEYED,
    ("get", "/v1/webhooks/events"): KEYED | {"422"},
    ("post", "/v1/webhooks/events/{event_id}/redeliver"): WITH_ID | {"409"},
    # Answered while the caller waits: OpenAI's dialect has its 400 for a bad field, and a 404
    # for a model it does not serve; every wait can end cancelled, failed or timed out.
    ("post", "/ai/run/{model}"): JSON_BODY | {"404"} | WAITS,
    ("post", "/v1/chat/completions"): (JSON_BODY - {"422"}) | {"404"} | WAITS,
    ("post", "/v1/completions"): (JSON_BODY - {"422"}) | {"404"} | WAITS,
    ("get", "/v1/models"): KEYED,
    ("get", "/v1/models/{model}"): WITH_ID,
}


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }


def test_every_operation_is_listed_here(spec: dict[str, Any]) -> None:
    assert set(operations(spec)) == set(ERRORS)


def test_every_route_but_healthz_needs_a_bearer_key(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert len(schemes) == 1
    [(name, scheme)] = schemes.items()
    assert scheme["type"] == "http" and scheme["scheme"].lower() == "bearer"
    for key, operation in operations(spec).items():
        expected: list[dict[str, list[str]]] = [] if key == ("get", "/healthz") else [{name: []}]
        assert operation.get("security", []) == expected, key
        # The key is the scheme's business, not a header parameter of each route.
        names = {p["name"].lower() for p in operation.get("parameters", [])}
        assert "authorization" not in names, key


@pytest.mark.parametrize(("method", "path"), sorted(ERRORS))
def test_each_operation_documents_the_errors_it_can_answer(
    spec: dict[str, Any], method: str, path: str
) -> None:
    responses = spec["paths"][path][method]["responses"]
    errors = {status for status in responses if status[0] in "45"}
    assert errors == ERRORS[(method, path)]
    ref = CLOUDFLARE_ERROR_REF if path.startswith("/ai/run") else ERROR_REF
    for status in errors:
        content = responses[status]["content"]
        assert content == {"application/json": {"schema": {"$ref": ref}}}, status
    if "503" in responses:
        assert "Retry-After" in responses["503"]["headers"]


def test_the_error_schema_is_the_error_the_api_answers(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    error = schemas["ErrorResponse"]
    assert error["required"] == ["error"]
    detail = schemas[error["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert set(detail["required"]) == {"code", "message", "param"}
    assert detail["properties"]["code"]["type"] == "string"
    assert detail["properties"]["message"]["type"] == "string"
    assert detail["properties"]["param"]["anyOf"] == [{"type": "string"}, {"type": "null"}]


def test_fastapis_detail_422_is_gone(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]


def test_file_content_is_documented_as_bytes(spec: dict[str, Any]) -> None:
    ok = spec["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["application/octet-stream"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic bm9wZQ=="}],
    ids=["none", "wrong", "not-bearer"],
)
def test_a_missing_or_wrong_key_is_the_documented_401(
    client: TestClient, headers: dict[str, str]
) -> None:
    # FastAPI's own security classes answer 403/401 `{"detail": ...}`; ours must not.
    response = client.get("/v1/loras", headers=headers)
    assert response.status_code == 401
    assert ErrorResponse.model_validate(response.json()).error.code == "unauthorized"


def test_a_422_has_the_documented_shape(client: TestClient, alice: dict[str, str]) -> None:
    response = client.get("/v1/batches", params={"limit": 0}, headers=alice)
    assert response.status_code == 422
    assert ErrorResponse.model_validate(response.json()).error.param == "limit"


@pytest.mark.parametrize(
    ("path", "text_fields"),
    [("/v1/files", {"purpose"}), ("/v1/loras", {"name", "base_model"})],
)
def test_required_form_text_is_at_least_one_character(
    spec: dict[str, Any], path: str, text_fields: set[str]
) -> None:
    media = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
    form = spec["components"]["schemas"][media["schema"]["$ref"].rsplit("/", 1)[1]]
    non_empty = {name for name, field in form["properties"].items() if field.get("minLength")}
    assert non_empty == text_fields


def test_an_empty_form_field_is_the_422_the_document_implies(
    client: TestClient, alice: dict[str, str]
) -> None:
    files = {"file": ("lines.jsonl", b"{}\n")}
    response = client.post("/v1/files", files=files, data={"purpose": ""}, headers=alice)
    assert response.status_code == 422
    assert ErrorResponse.model_validate(response.json()).error.param == "purpose"
