"""`response_format`, as OpenAI defines it: checked in the API, and turned into the one JSON
Schema that the worker enforces while decoding.

`{"type": "text"}` (or no `response_format`) is free text; `{"type": "json_object"}` is any
JSON object; `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` is an
answer that follows `schema`. The schema is checked against the metaschema of its own draft
(its `$schema`, else the latest), with `jsonschema` alone: the grammar library belongs to
the worker, which fails a row whose schema it cannot compile (`invalid_response_format`).
"""

import functools
import json
import re
from typing import Any

import jsonschema
import jsonschema.exceptions

from jobs.errors import InvalidParameter

PARAM = "response_format"
# OpenAI's rule for a schema's name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A schema is compiled on the worker and kept with each job: bounded, like any other field.
MAX_SCHEMA_CHARS = 65536
# What `json_object` asks for, as a schema.
ANY_OBJECT = {"type": "object"}


def schema_text(response_format: Any) -> str | None:
    """The JSON Schema a `response_format` asks for, as canonical JSON text (sorted keys, no
    spaces: the same text for the same schema, so the worker compiles it once); None for
    free text. Raises `InvalidParameter` naming `response_format` for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _invalid(response_format, "must be an object with a type")
    kind = response_format.get("type")
    if kind == "text":
        _only_keys(response_format, {"type"})
        return None
    if kind == "json_object":
        _only_keys(response_format, {"type"})
        return _canonical(ANY_OBJECT)
    if kind == "json_schema":
        _only_keys(response_format, {"type", "json_schema"})
        return _canonical(_checked_schema(response_format.get("json_schema")))
    raise _invalid(kind, "type must be one of 'text', 'json_object', 'json_schema'", ".type")


def _checked_schema(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise _invalid(spec, "json_schema must be an object with a name and a schema", "")
    _only_keys(spec, {"name", "schema", "strict", "description"}, ".json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid(name, "name must be 1 to 64 letters, digits, '_' or '-'", ".json_schema")
    if not isinstance(spec.get("strict", False), bool):
        raise _invalid(spec.get("strict"), "strict must be a boolean", ".json_schema")
    if not isinstance(spec.get("description", ""), str):
        raise _invalid(spec.get("description"), "description must be a string", ".json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _invalid(schema, "schema must be a JSON Schema object", ".json_schema")
    if not isinstance(schema.get("$schema", ""), str):
        raise _invalid(schema["$schema"], "schema's $schema must be a URI", ".json_schema")
    try:
        text = _canonical(schema)
    except RecursionError:
        raise _invalid("...", "schema is nested too deeply", ".json_schema") from None
    if len(text) > MAX_SCHEMA_CHARS:
        reason = f"schema is longer than {MAX_SCHEMA_CHARS} characters as JSON"
        raise _invalid("...", reason, ".json_schema")
    _check_schema(text)
    return schema


@functools.lru_cache(maxsize=256)
def _check_schema(text: str) -> None:
    """Raise unless the schema (canonical JSON) is a valid JSON Schema for its draft. A batch
    usually repeats one schema on every line: it is checked once (a refusal is not kept)."""
    try:
        schema = json.loads(text)
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "".join(f"[{part!r}]" for part in exc.absolute_path)
        reason = f"schema{where} is not a valid JSON Schema: {exc.message}"
        raise _invalid("...", reason, ".json_schema") from None
    except RecursionError:
        raise _invalid("...", "schema is nested too deeply", ".json_schema") from None


def _only_keys(value: dict[str, Any], allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _invalid(unknown[0], f"unknown field {unknown[0]!r}", where)


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _invalid(value: Any, reason: str, where: str = "") -> InvalidParameter:
    return InvalidParameter(PARAM + where, value, reason)
