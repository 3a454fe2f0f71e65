"""Checking batch lines on fixed inputs: whatever a line holds, it becomes a valid line or an
error with its line number, and an error can always be stored."""

import json
from typing import Any

import pytest

from jobs.batches.lines import (
    MAX_CUSTOM_ID_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_PARAM_CHARS,
    InvalidLine,
    LineChecker,
    ValidLine,
)
from jobs.schemas.base import storable_text
from jobs.settings import Settings

CHAT = "/v1/chat/completions"


@pytest.fixture
def checker() -> LineChecker:
    settings = Settings(_env_file=None, model="tiny-random-mistral")  # type: ignore[call-arg]
    return LineChecker(CHAT, settings, adapter_id=None)


def line(custom_id: Any = "row", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body},
    }


def encoded(data: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a hostile file would hold them.
    return json.dumps(data).encode()


def nested(depth: int) -> Any:
    """An object `depth` levels deep: parsed by json, refused by the checks."""
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


def with_body(text: str) -> bytes:
    return b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": ' + (
        text.encode() + b"}"
    )


POISON: dict[str, bytes] = {
    "NUL in custom_id": encoded(line("row\x00")),
    "lone surrogate in custom_id": encoded(line("row\ud800")),
    "custom_id over 512 characters": encoded(line("r" * (MAX_CUSTOM_ID_CHARS + 1))),
    "custom_id not a string": encoded(line(12)),
    "unknown key over 256 characters": encoded({**line(), "k" * 5000: 1}),
    "deeply nested body": encoded({**line(), "body": nested(500)}),
    "body nested too deeply for json": with_body('{"a":' * 5000 + "1" + "}" * 5000),
    "deeply nested JSON": b"[" * 100_000 + b"]" * 100_000,
    "deeply nested value in the body": encoded(line(messages=nested(500))),
    "deeply nested unknown key": encoded({**line(), "extra": nested(500)}),
    "integer of 5000 digits": b'{"custom_id": "x", "n": ' + b"9" * 5000 + b"}",
    "NUL in content": encoded(line(messages=[{"role": "user", "content": "a\x00b"}])),
    "lone surrogate in stop": encoded(line(stop=["\ud800"])),
    "seed over 2**63": encoded(line(seed=2**70)),
    "negative seed": encoded(line(seed=-5)),
    "max_tokens true": encoded(line(max_tokens=True)),
    "max_tokens as text": encoded(line(max_tokens="5")),
    "temperature NaN": with_body(
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    ),
    "not UTF-8": b'{"custom_id": "\xff\xfe"}',
    "top_k over 2**31": encoded(line(top_k=2**40)),
}


@pytest.mark.parametrize("raw", POISON.values(), ids=POISON.keys())
def test_a_poison_line_is_an_error_line_that_can_be_stored(
    checker: LineChecker, raw: bytes
) -> None:
    result = checker.check(7, raw)
    assert isinstance(result, InvalidLine), result
    assert result.line == 7 and result.message.startswith("line 7: ")
    # Each poison is foreseen and named, not caught by the last-resort guard.
    assert "could not be read" not in result.message
    assert len(result.message) <= MAX_MESSAGE_CHARS
    storable_text(result.message)
    if result.param is not None:
        assert len(result.param) <= MAX_PARAM_CHARS
        storable_text(result.param)
    if result.custom_id is not None:
        assert len(result.custom_id) <= MAX_CUSTOM_ID_CHARS
        storable_text(result.custom_id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**63}, "body.seed"),
        ({"seed": -1}, "body.seed"),
        ({"max_tokens": "5"}, "body.max_tokens"),
        ({"stop": ["ok", "\ud800"]}, "body.stop"),
        ({"messages": [{"role": "user", "content": "a\x00"}]}, "body.messages[0].content"),
    ],
)
def test_a_bad_field_is_named(checker: LineChecker, body: dict[str, Any], param: str) -> None:
    result = checker.check(3, encoded(line(**body)))
    assert isinstance(result, InvalidLine)
    assert (result.code, result.param) == ("invalid_parameter", param)


def test_the_largest_seed_and_zero_are_valid(checker: LineChecker) -> None:
    assert isinstance(checker.check(1, encoded(line("a", seed=2**63 - 1))), ValidLine)
    assert isinstance(checker.check(2, encoded(line("b", seed=0))), ValidLine)


def test_a_refused_custom_id_is_not_kept_and_does_not_count_as_seen(checker: LineChecker) -> None:
    refused = checker.check(1, encoded(line("x" * 600)))
    assert isinstance(refused, InvalidLine) and refused.custom_id is None
    assert refused.param == "custom_id"
    assert isinstance(checker.check(2, encoded(line("x"))), ValidLine)
