"""`GET /v1/batches/{id}/output`: the lines finished so far, in line order, in any state of the
batch, with the resume cursor; and `mbatch submit --wait`'s follower, which appends them to
the output and error files as they finish. Lines are claimed and ended through the queries
the worker uses, against the real database and storage."""

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from api.app import create_app
from jobs import batches, queries
from jobs.db import session_scope
from jobs.models import Batch, BatchStatus, Job, LineError
from jobs.queries import Outcome
from jobs.settings import Settings
from jobs.storage import Storage, storage_from_settings
from jobs.tokenizer import TokenLogprob
from mbatch.submit import ApiClient, OutputFollower
from tests.integration.test_batch_counters import claim_line
from tests.integration.test_batch_steps import advance, chat_line, start_batch
from worker.results import place_response

RESUME = "x-mbatch-resume-after"


@pytest.fixture
def db(api_settings: Settings) -> Iterator[Session]:
    with session_scope(api_settings.database_url) as session:
        yield session


@pytest.fixture(scope="module")
def storage(api_settings: Settings) -> Storage:
    return storage_from_settings(api_settings)


def output(
    client: TestClient, headers: dict[str, str], batch_id: str, **params: Any
) -> tuple[int, list[dict[str, Any]]]:
    response = client.get(f"/v1/batches/{batch_id}/output", params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in response.content.split(b"\n") if line]
    return int(response.headers[RESUME]), lines


def numbers(lines: list[dict[str, Any]], batch_id: str) -> list[int]:
    """Each line's number, read back from its id (an output line does not carry it)."""
    by_id = {
        "batch_req_" + batches.line_job_id(batch_id, n).removeprefix("job_"): n
        for n in range(1, 100)
    }
    return [by_id[line["id"]] for line in lines]


def succeed(db: Session, storage: Storage, batch_id: str, line: int, *, stored: bool) -> None:
    """End a line as the worker does, its answer in the row or in object storage."""
    claim = claim_line(db, batch_id, line)
    text, key = place_response(storage, claim.job.id, f"answer {line}", 0 if stored else 1 << 20)
    outcome = Outcome(2, "stop", text, key, Decimal("0.5"), Decimal("0.25"), 0.1)
    assert queries.record_success(db, claim, outcome)


def fail(db: Session, batch_id: str, line: int) -> None:
    assert queries.record_failure(db, claim_line(db, batch_id, line), "engine_error", "boom")


def mixed_batch(client: TestClient, headers: dict[str, str]) -> str:
    """Lines 1, 2 and 4 to 8 good; line 3 refused; line 6 blank (a number, and no line)."""
    good = [json.dumps(chat_line(f"c{n}")).encode() for n in range(1, 9)]
    good[2] = b'{"not": "a line"}'
    good[5] = b""
    batch = start_batch(client, headers, good)
    assert batch["status"] == "validating"
    return str(batch["id"])


def test_the_lines_finished_so_far_come_in_line_order_with_the_resume_cursor(
    client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    batch_id = mixed_batch(client, alice)
    assert client.get(f"/v1/batches/{batch_id}", headers=alice).json()["status"] == "in_progress"

    # Nothing has run: only the refused line, and line 1 has not finished.
    resume, lines = output(client, alice, batch_id)
    assert (resume, numbers(lines, batch_id)) == (0, [3])
    assert lines[0]["response"] is None
    assert lines[0]["error"]["line"] == 3 and lines[0]["error"]["code"] == "missing_custom_id"

    # Lines finish out of order: 5 fails, 2 and then 1 succeed, one answer kept in storage.
    fail(db, batch_id, 5)
    succeed(db, storage, batch_id, 2, stored=True)
    succeed(db, storage, batch_id, 1, stored=False)
    resume, lines = output(client, alice, batch_id)
    assert (resume, numbers(lines, batch_id)) == (3, [1, 2, 3, 5])  # line 4 is still queued
    first, second, _, failed = lines
    assert first["custom_id"] == "c1" and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "answer 1"
    assert first["response"]["body"]["usage"]["estimated_cost"] == 0.75
    assert second["response"]["body"]["choices"][0]["message"]["content"] == "answer 2"
    assert failed["response"] is None
    assert failed["error"] == {"code": "engine_error", "message": "boom", "param": None, "line": 5}

    # From the cursor: what is past it, the line already had (5) included, and nothing before.
    resume, lines = output(client, alice, batch_id, after=resume)
    assert (resume, numbers(lines, batch_id)) == (3, [5])

    # Line 4 ends: the cursor moves past 5, and over blank line 6, to just below line 7.
    succeed(db, storage, batch_id, 4, stored=False)
    resume, lines = output(client, alice, batch_id, after=3)
    assert (resume, numbers(lines, batch_id)) == (6, [4, 5])
    succeed(db, storage, batch_id, 7, stored=False)
    resume, lines = output(client, alice, batch_id, after=6)
    assert (resume, numbers(lines, batch_id)) == (7, [7])
    fail(db, batch_id, 8)
    resume, lines = output(client, alice, batch_id, after=7)
    assert (resume, numbers(lines, batch_id)) == (8, [8])
    # Every line has finished: nothing is past the cursor.
    assert output(client, alice, batch_id, after=8) == (8, [])


def test_paging_with_the_cursor_and_a_limit_sends_each_line_once(
    client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    batch_id = mixed_batch(client, alice)
    for line in (1, 2, 4, 5, 7):
        succeed(db, storage, batch_id, line, stored=False)  # 8 is still queued

    # A limit cuts the answer short: the cursor is then no further than its last line.
    resume, lines = output(client, alice, batch_id, limit=2)
    assert (resume, numbers(lines, batch_id)) == (2, [1, 2])
    seen, after = numbers(lines, batch_id), resume
    while True:
        resume, lines = output(client, alice, batch_id, after=after, limit=2)
        if not lines:
            break
        assert min(numbers(lines, batch_id)) > after
        seen += numbers(lines, batch_id)
        after = resume
    assert seen == [1, 2, 3, 4, 5, 7]  # each once, in order, and 8 not yet
    assert after == 7

    # A limit past the end changes nothing.
    assert output(client, alice, batch_id, limit=100) == output(client, alice, batch_id)
    fail(db, batch_id, 8)
    assert numbers(output(client, alice, batch_id, after=7, limit=1)[1], batch_id) == [8]


def file_lines(client: TestClient, headers: dict[str, str], file_id: str | None) -> list[Any]:
    if file_id is None:
        return []
    content = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert content.status_code == 200
    return [json.loads(line) for line in content.text.splitlines()]


def test_once_ended_the_output_is_the_output_and_error_files_merged_by_line(
    client: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    db: Session,
    storage: Storage,
) -> None:
    batch_id = mixed_batch(client, alice)
    succeed(db, storage, batch_id, 1, stored=True)
    succeed(db, storage, batch_id, 2, stored=True)
    fail(db, batch_id, 4)
    # Line 7's stored answer is lost: it is an error line here as in the error file.
    claim = claim_line(db, batch_id, 7)
    _, key = place_response(storage, claim.job.id, "gone", 0)
    assert key is not None
    lost = Outcome(2, "stop", None, key, Decimal(0), Decimal(0), 0.1)
    assert queries.record_success(db, claim, lost)
    storage.delete(key)
    # The rest (5 and 8) is cancelled with the batch.
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=alice).status_code == 200
    before_files = output(client, alice, batch_id)
    advance(api_settings, storage)
    ended = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert ended["status"] == "cancelled"

    resume, lines = output(client, alice, batch_id)
    assert (resume, numbers(lines, batch_id)) == (8, [1, 2, 3, 4, 5, 7, 8])
    assert (resume, lines) == before_files  # cancelling, then cancelled: the same lines
    assert [line for line in lines if line["error"] is None] == file_lines(
        client, alice, ended["output_file_id"]
    )
    errors = [line for line in lines if line["error"] is not None]
    assert errors == file_lines(client, alice, ended["error_file_id"])
    assert [e["error"]["code"] for e in errors] == [
        "missing_custom_id",
        "engine_error",
        "batch_cancelled",
        "result_unavailable",
        "batch_cancelled",
    ]


def test_while_validating_the_cursor_stops_at_the_last_line_recorded(
    client: TestClient, alice: dict[str, str], db: Session, storage: Storage
) -> None:
    batch_id = mixed_batch(client, alice)
    for line in (1, 2, 4, 5, 7):
        succeed(db, storage, batch_id, line, stored=False)
    # As if validation had recorded lines 1 to 5 only, and was still at it.
    db.execute(delete(Job).where(Job.batch_id == batch_id, Job.line > 5))
    db.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.validating))
    db.commit()
    resume, lines = output(client, alice, batch_id)
    assert (resume, numbers(lines, batch_id)) == (5, [1, 2, 3, 4, 5])
    # Nothing recorded yet: nothing has finished.
    db.execute(delete(Job).where(Job.batch_id == batch_id))
    db.execute(delete(LineError).where(LineError.batch_id == batch_id))
    db.commit()
    assert output(client, alice, batch_id) == (0, [])


def test_another_owners_batch_is_not_found_and_a_bad_cursor_is_a_422(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    batch_id = mixed_batch(client, alice)
    for headers, path in (
        (bob, f"/v1/batches/{batch_id}/output"),
        (alice, "/v1/batches/batch_nosuch/output"),
    ):
        response = client.get(path, headers=headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    for params, param in (
        ({"after": -1}, "after"),
        ({"after": "three"}, "after"),
        ({"after": 1 << 40}, "after"),
        ({"limit": 0}, "limit"),
        ({"limit": "x"}, "limit"),
    ):
        response = client.get(f"/v1/batches/{batch_id}/output", params=params, headers=alice)
        assert response.status_code == 422, params
        assert response.json()["error"]["param"] == param


@pytest.fixture
def alice_api(api_settings: Settings, alice: dict[str, str]) -> Iterator[ApiClient]:
    """The CLI's client, speaking to the API in this process."""
    with TestClient(create_app(api_settings), headers=alice) as http:
        api = ApiClient("http://testserver", "unused")
        api.http = http
        yield api


def test_submit_wait_appends_each_line_once_as_it_finishes(
    alice_api: ApiClient,
    client: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    db: Session,
    storage: Storage,
    tmp_path: Path,
) -> None:
    batch_id = mixed_batch(client, alice)
    out, err = tmp_path / "in.output.jsonl", tmp_path / "in.error.jsonl"
    err.write_text("left by an earlier run\n")
    follower = OutputFollower(alice_api, batch_id, out, err)

    def written() -> tuple[list[str], list[str]]:
        read = [p.read_text().splitlines() if p.exists() else [] for p in (out, err)]
        return [json.loads(x)["custom_id"] for x in read[0]], [
            json.loads(x)["custom_id"] for x in read[1]
        ]

    assert follower.poll() == 1  # the refused line
    assert written() == ([], [None])  # its custom_id could not be read
    succeed(db, storage, batch_id, 2, stored=False)
    fail(db, batch_id, 5)
    assert follower.poll() == 2
    assert written() == (["c2"], [None, "c5"])
    # 2 and 5 are past the cursor (0, as line 1 has not finished): they come again, and are
    # dropped.
    assert follower.after == 0
    succeed(db, storage, batch_id, 1, stored=False)
    assert follower.poll() == 1
    assert follower.after == 3
    assert follower.poll() == 0
    for line in (4, 7, 8):
        succeed(db, storage, batch_id, line, stored=True)
    assert follower.poll() == 3
    follower.close()
    assert written() == (["c2", "c1", "c4", "c7", "c8"], [None, "c5"])
    assert follower.written() == {"output": out, "error": err}

    # Once the batch has ended, the files hold what the batch's own files hold.
    advance(api_settings, storage)
    ended = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert ended["status"] == "completed"
    for path, file_id in ((out, ended["output_file_id"]), (err, ended["error_file_id"])):
        mine = [json.loads(x) for x in path.read_text().splitlines()]
        assert sorted(mine, key=lambda x: x["id"]) == sorted(
            file_lines(client, alice, file_id), key=lambda x: x["id"]
        )


def test_a_completion_line_with_logprobs_streams_them_in_the_legacy_shape(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    # A completion's text offsets count from its prompt, which the stream must read for it.
    line = {
        "custom_id": "p1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "Say hi", "max_tokens": 2, "logprobs": 1},
    }
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
        headers=alice,
    ).json()
    made = client.post(
        "/v1/batches",
        json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions"},
        headers=alice,
    ).json()
    batch_id = made["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers=alice).json()["status"] == "in_progress"
    claim = claim_line(db, batch_id, 1)
    entry = TokenLogprob(token=" hi", logprob=-0.5, bytes=list(b" hi"), top_logprobs=[])
    outcome = Outcome(1, "length", " hi", None, Decimal("0"), Decimal("0"), 0.1, [entry])
    assert queries.record_success(db, claim, outcome)

    resume, lines = output(client, alice, batch_id)
    assert resume == 1
    logprobs = lines[0]["response"]["body"]["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" hi"] and logprobs["token_logprobs"] == [-0.5]
    assert logprobs["text_offset"] == [len("Say hi")]
