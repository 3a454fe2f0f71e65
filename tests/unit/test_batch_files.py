"""Reading batch files in pieces, and the output format, on fixed inputs."""

import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from jobs import files
from jobs.batches.output_format import error_line, output_line
from jobs.models import Job


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_lines_are_read_in_pieces_and_overlong_lines_skipped(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", chunk)
    data = b'{"a": 1}\n\n' + b"x" * 20 + b"\nlast line without newline"
    lines = list(files.read_lines(io.BytesIO(data), max_line_bytes=12))
    assert lines == [b'{"a": 1}', b"", None, None]
    assert list(files.read_lines(io.BytesIO(data), max_line_bytes=100))[2:] == [
        b"x" * 20,
        b"last line without newline",
    ]


def test_lines_and_bytes_are_counted_with_or_without_a_last_newline() -> None:
    assert files.count_lines(io.BytesIO(b"a\nb\n")) == (4, 2)
    assert files.count_lines(io.BytesIO(b"a\nb")) == (3, 2)
    assert files.count_lines(io.BytesIO(b"")) == (0, 0)


def finished_job() -> Job:
    return Job(
        id="job_abc",
        model="tiny-random-mistral",
        custom_id="row-1",
        prompt_tokens=10,
        completion_tokens=5,
        finish_reason="length",
        cost_input=Decimal("0.000001"),
        cost_output=Decimal("0.000001"),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC),
    )


def test_a_chat_line_is_a_chat_completion_with_its_cost() -> None:
    line = output_line(finished_job(), "hello", "/v1/chat/completions")
    assert line["custom_id"] == "row-1" and line["error"] is None
    assert line["response"]["status_code"] == 200
    body = line["response"]["body"]
    assert body["object"] == "chat.completion" and body["created"] == 1767225605
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "estimated_cost": 0.000002,
    }


def test_a_completion_line_is_a_text_completion() -> None:
    body = output_line(finished_job(), "hello", "/v1/completions")["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hello"


def test_an_error_line_names_its_line() -> None:
    line = error_line("job_abc", "row-1", 7, "invalid_json", "line 7: not JSON")
    assert line["response"] is None
    assert line["error"] == {
        "code": "invalid_json",
        "message": "line 7: not JSON",
        "param": None,
        "line": 7,
    }
