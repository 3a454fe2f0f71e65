"""The OpenAPI document, true to what the API answers: the bearer key, and the error responses
each operation can give, in its dialect's shape (`api.dialects`): `{"error": {code, message,
param, type}}`, or Cloudflare's envelope on the Workers AI paths."""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from api.dialects import Dialect, dialect_of
from api.dialects.workers_ai import CloudflareErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"
JSON = "application/json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Stable and machine-readable, e.g. `invalid_parameter`, `not_found`."
    )
    message: str = Field(description="For people: what was wrong, with the value.")
    param: str | None = Field(description="The request field at fault, where there is one.")
    type: str = Field(
        default="invalid_request_error",
        description="OpenAI's error type: `invalid_request_error`, `authentication_error`, "
        "`not_found_error`, `rate_limit_error`, `api_error`...",
    )


class ErrorResponse(BaseModel):
    """Every error the API answers."""

    error: ErrorDetail


DESCRIPTIONS = {
    400: "The body is not valid JSON, or not a readable multipart form.",
    401: "No API key, or one that is not valid.",
    404: "No such object among the key owner's.",
    409: "The object is not in a state that allows this (for an answer waited for: its job "
    "was cancelled meanwhile).",
    410: "The file is on record, but its stored contents are gone.",
    413: "The request body is over its size limit.",
    422: "A parameter is missing, of the wrong type or out of range; `param` names it.",
    502: "The job failed on its worker; `x-mbatch-job-id` names it.",
    503: "A service the API needs (database, storage) is down; try again later.",
    504: "The job did not end within the sync timeout; it goes on: poll `GET /v1/jobs/{id}` "
    "with the id in `x-mbatch-job-id`.",
}
# OpenAI's dialect answers a field out of range with its 400, never a 422.
OPENAI_400 = "The body is not valid JSON, or a parameter is missing, of the wrong type or out of "
OPENAI_400 += "range; `param` names it."

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    }
}

# What the document cannot show of itself, by (method, path): the domain errors a handler
# raises. Each entry must name an operation, so a renamed route fails loudly here.
CONFLICTS = {
    ("post", "/v1/jobs/{job_id}/cancel"),
    ("post", "/v1/batches/{batch_id}/cancel"),
    ("post", "/v1/batches/{batch_id}/retry"),
    ("post", "/v1/webhooks/events/{event_id}/redeliver"),
}
# A body field that names another object (a batch's `input_file_id`), which may not exist.
REFERENCES = {("post", "/v1/batches"), ("post", "/v1/schedules")}
# Operations that read a file's stored contents, which may have been lost.
READS_CONTENT = {
    ("get", "/v1/files/{file_id}/content"),
    ("post", "/v1/batches"),
    ("post", "/v1/batches/{batch_id}/retry"),
}
# Answered as raw bytes, not JSON.
DOWNLOADS = {("get", "/v1/files/{file_id}/content")}
# Answered while the caller waits for a job (`api.interactive`): it may be cancelled meanwhile
# (409), fail on its worker (502) or not end within the sync timeout (504).
WAITS = {
    ("post", "/v1/jobs"),
    ("post", "/ai/run/{model}"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json) FastAPI's document with the errors
    documented."""
    generate = app.openapi
    documented: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        # FastAPI caches its document, and builds a new one when routes are added.
        document = generate()
        if not documented or documented[0] is not document:
            document_errors(document)
            documented[:] = [document]
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def error_statuses(operation: dict[str, Any], key: tuple[str, str]) -> set[int]:
    """The error statuses an operation can answer, read from its own document where the
    document says it (security, parameters, body) and from the tables above where not."""
    statuses: set[int] = set()
    parameters = operation.get("parameters", [])
    body = operation.get("requestBody")
    if operation.get("security"):
        # The key is looked up in Postgres, so a route that needs one is also a 503 while
        # the database (or the storage it goes on to) is down.
        statuses |= {401, 503}
    if any(p["in"] == "path" for p in parameters) or key in REFERENCES:
        statuses.add(404)
    if key in CONFLICTS:
        statuses.add(409)
    if key in READS_CONTENT:
        statuses.add(410)
    if body is not None:
        # Invalid JSON, or a multipart form the parser cannot read, is a 400.
        statuses |= {400, 413}
    if parameters or body is not None or "422" in operation.get("responses", {}):
        statuses.add(422)
    if key in WAITS:
        statuses |= {409, 502, 504}
    if dialect_of(key[1]) is Dialect.openai:
        # OpenAI's 400 for a field out of range, and its 404 for a model it does not serve.
        statuses = (statuses - {422}) | {400, 404}
    return statuses


def error_response(status: int, dialect: Dialect) -> dict[str, Any]:
    schema = "CloudflareErrorResponse" if dialect is Dialect.workers_ai else "ErrorResponse"
    description = DESCRIPTIONS[status]
    if dialect is Dialect.openai and status == 400:
        description = OPENAI_400
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": {"$ref": REF_TEMPLATE.format(model=schema)}}},
    }
    if status == 503:
        response["headers"] = RETRY_AFTER
    return response


def document_errors(document: dict[str, Any]) -> None:
    """Add the error responses to every operation of `document`, in place; FastAPI's own 422
    (`HTTPValidationError`, `{"detail": ...}`) is replaced, as the API never answers it."""
    operations = {
        (method, path): operation
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
        if method in METHODS
    }
    unknown = (CONFLICTS | REFERENCES | READS_CONTENT | DOWNLOADS | WAITS) - operations.keys()
    if unknown:
        raise RuntimeError(f"api/openapi.py names operations the API does not have: {unknown}")
    for key, operation in operations.items():
        responses = operation.setdefault("responses", {})
        statuses = error_statuses(operation, key)
        if 422 not in statuses:  # FastAPI's own, where OpenAI's dialect answers a 400
            responses.pop("422", None)
        for status in statuses:
            responses[str(status)] = error_response(status, dialect_of(key[1]))
        if key in DOWNLOADS:
            success = next(code for code in sorted(responses) if code.startswith("2"))
            responses[success]["content"] = {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        operation["responses"] = dict(sorted(responses.items()))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for operation in operations.values():
        _forms_refuse_empty_text(operation, schemas)
    _, definitions = models_json_schema(
        [(ErrorResponse, "serialization"), (CloudflareErrorResponse, "serialization")],
        ref_template=REF_TEMPLATE,
    )
    for name, schema in definitions["$defs"].items():
        if schemas.setdefault(name, schema) != schema:
            raise RuntimeError(f"two different schemas are named {name}")
    for name in ("HTTPValidationError", "ValidationError"):
        if not _references(document, REF_TEMPLATE.format(model=name)):
            schemas.pop(name, None)


def _forms_refuse_empty_text(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """FastAPI reads an empty text field of a form as a missing one (a 422), so a required
    text field takes at least one character."""
    media = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if media is None:
        return
    form = media["schema"]
    if "$ref" in form:
        form = schemas[form["$ref"].rsplit("/", 1)[1]]
    for name in form.get("required", []):
        field = form["properties"][name]
        is_file = "contentMediaType" in field or field.get("format") == "binary"
        if field.get("type") == "string" and not is_file:
            field["minLength"] = max(1, field.get("minLength", 0))


def _references(document: dict[str, Any], ref: str) -> bool:
    """Whether anything in the document but the schema itself points to `ref`."""
    name = ref.rsplit("/", 1)[1]

    def walk(node: Any, path: tuple[str, ...]) -> bool:
        if path[:3] == ("components", "schemas", name):
            return False
        if isinstance(node, dict):
            if node.get("$ref") == ref:
                return True
            return any(walk(value, (*path, key)) for key, value in node.items())
        if isinstance(node, list):
            return any(walk(value, path) for value in node)
        return False

    return walk(document, ())
