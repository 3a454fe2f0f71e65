"""The OpenAI Batch API through the whole stack, driven by the official `openai` SDK."""

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from jobs.db import session_scope
from jobs.models import Batch, FileObject, Job, JobStatus
from jobs.settings import Settings
from tests import services
from tests.conftest import BUCKET, Stack, create_key

ENDED = {"completed", "failed", "expired", "cancelled"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return create_key(stack.env, "frank")


@pytest.fixture(scope="module")
def client(stack: Stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


def chat_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "tiny-random-mistral",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0,
            **body,
        },
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


BAD_LINES: dict[int, Any] = {
    7: b'{"custom_id": "broken", "method": ',
    15: {k: v for k, v in chat_line("x", "hi").items() if k != "custom_id"},
    23: chat_line("line-1", "a custom_id used before"),
    40: {**chat_line("wrong-url", "hi"), "url": "/v1/completions"},
    55: chat_line("too-hot", "hi", temperature=3),
    70: chat_line("no-model", "hi", model="gpt-4o"),
    88: chat_line("no-adapter", "hi", lora="nobody-has-this"),
    101: chat_line("no-tokens", "hi", max_tokens=0),
    130: {**chat_line("no-messages", "hi"), "body": {"model": "tiny-random-mistral"}},
    160: chat_line("top-p", "hi", top_p=0),
}


def two_hundred_lines() -> list[Any]:
    return [
        BAD_LINES.get(n, chat_line(f"line-{n}", f"Question number {n}?")) for n in range(1, 201)
    ]


def wait_until_ended(client: OpenAI, batch_id: str, timeout: float = 120) -> Any:
    found: dict[str, Any] = {}

    def ended() -> bool:
        found["batch"] = client.batches.retrieve(batch_id)
        return found["batch"].status in ENDED

    services.wait_for(ended, timeout, f"batch {batch_id} to end", interval=0.2)
    return found["batch"]


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_file_with_bad_lines_runs_the_rest_and_reports_each_bad_line(
    client: OpenAI, stack: Stack, key: str
) -> None:
    uploaded = client.files.create(file=("data.jsonl", jsonl(two_hundred_lines())), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "data.jsonl"

    estimate = httpx.post(
        f"{stack.api_url}/v1/batches",
        json={"input_file_id": uploaded.id, "endpoint": CHAT, "dry_run": True},
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert estimate["valid_lines"] == 190 and estimate["invalid_lines"] == 10
    assert 0 < estimate["cost"]["min"] < estimate["cost"]["max"]

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"dataset": "questions"},
    )
    assert batch.status == "validating" and batch.metadata == {"dataset": "questions"}
    done = wait_until_ended(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (200, 190)
    assert done.request_counts.failed == 10
    assert done.completed_at is not None and done.in_progress_at is not None

    outputs = lines_of(client, done.output_file_id)
    assert len(outputs) == 190
    good_ids = {f"line-{n}" for n in range(1, 201) if n not in BAD_LINES}
    assert {line["custom_id"] for line in outputs} == good_ids
    first = outputs[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["estimated_cost"] > 0
    # The dry run counted exactly the prompt tokens the run reports.
    assert (
        sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in outputs)
        == (estimate["prompt_tokens"])
    )

    errors = lines_of(client, done.error_file_id)
    assert [line["error"]["line"] for line in errors] == sorted(BAD_LINES)
    by_line = {line["error"]["line"]: line["error"] for line in errors}
    assert by_line[7]["code"] == "invalid_json"
    assert by_line[15]["code"] == "missing_custom_id"
    assert by_line[23]["code"] == "duplicate_custom_id"
    assert by_line[40]["param"] == "url"
    assert by_line[55]["param"] == "body.temperature"
    assert by_line[70]["param"] == "body.model"
    assert by_line[88]["param"] == "body.lora"
    assert by_line[101]["param"] == "body.max_tokens"
    assert by_line[130]["param"] == "body.messages"
    assert by_line[160]["param"] == "body.top_p"
    assert all(f"line {n}" in by_line[n]["message"] for n in BAD_LINES)

    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_a_file_of_only_bad_lines_fails(client: OpenAI) -> None:
    uploaded = client.files.create(
        file=("bad.jsonl", jsonl([b"not json", {"custom_id": "x"}])), purpose="batch"
    )
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = wait_until_ended(client, batch.id)
    assert done.status == "failed" and done.errors is not None and done.errors.data
    assert len(lines_of(client, done.error_file_id)) == 2


def slow_lines(short: int, long: int) -> list[Any]:
    """Short lines first, then long ones: the first batches finish quickly, the later ones
    decode for a while."""
    return [chat_line(f"short-{n}", f"Hi {n}", max_tokens=2) for n in range(short)] + [
        chat_line(f"long-{n}", "Tell a long story. " * 40, max_tokens=1500) for n in range(long)
    ]


def assert_partial_output_and_nothing_after(
    client: OpenAI, settings: Settings, done: Any, stopped: str = "cancelling_at"
) -> None:
    """The lines that succeeded are in the output, and none succeeded later than a second
    after the batch stopped (at its row's `stopped` time, to the microsecond: the API's
    times are cut to the second, which would leave no margin at all for a line recorded as
    the batch stopped)."""
    with session_scope(settings.database_url) as session:
        batch = session.get(Batch, done.id)
        when = getattr(batch, stopped, None)
        assert when is not None, f"batch {done.id} has no {stopped}"
        stopped_at = when.timestamp()
        jobs = session.query(Job).filter(Job.batch_id == done.id).all()
        succeeded = {job.custom_id for job in jobs if job.status == JobStatus.succeeded}
        assert all(job.status.finished for job in jobs)
        late = [
            job.id
            for job in jobs
            if job.status == JobStatus.succeeded
            and job.finished_at is not None
            and job.finished_at.timestamp() > stopped_at + 1
        ]
        assert not late
    outputs = lines_of(client, done.output_file_id)
    assert {line["custom_id"] for line in outputs} == succeeded
    assert 0 < len(succeeded) < done.request_counts.total
    assert done.request_counts.completed == len(succeeded)


def test_cancel_mid_run_keeps_the_finished_lines_and_runs_nothing_more(
    client: OpenAI, settings: Settings
) -> None:
    uploaded = client.files.create(file=("slow.jsonl", jsonl(slow_lines(32, 40))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    services.wait_for(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) > 0,  # type: ignore[union-attr]
        60,
        "the first lines to finish",
        interval=0.1,
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_until_ended(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    time.sleep(2)  # a job still decoding when the batch stopped must not be recorded
    assert_partial_output_and_nothing_after(client, settings, done)


@pytest.fixture(scope="module")
def short_window_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API whose batches expire after a few seconds; the worker is the same."""
    env = {**stack.env, "MBATCH_BATCH_WINDOW_SECONDS": "4"}
    api, url = services.start_api(env, tmp_path_factory.mktemp("short-window"))
    yield url
    api.stop()


def test_expiry_keeps_the_finished_lines_and_runs_nothing_more(
    short_window_api: str, key: str, settings: Settings
) -> None:
    client = OpenAI(base_url=f"{short_window_api}/v1", api_key=key, max_retries=0)
    uploaded = client.files.create(file=("slow.jsonl", jsonl(slow_lines(32, 40))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = wait_until_ended(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    time.sleep(2)
    assert_partial_output_and_nothing_after(client, settings, done, stopped="expired_at")
    with session_scope(settings.database_url) as session:
        row = session.get(Batch, done.id)
        assert row is not None and row.expired_at is not None


def test_the_same_idempotency_key_gives_the_same_batch_and_retry_runs_the_failed_lines(
    client: OpenAI, stack: Stack, key: str
) -> None:
    lines = [chat_line("good", "hi"), chat_line("bad", "hi", temperature=9), b"{oops"]
    uploaded = client.files.create(file=("mixed.jsonl", jsonl(lines)), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint=CHAT,
            completion_window="24h",
            extra_headers={"Idempotency-Key": "nightly-run"},
        )
        for _ in range(2)
    ]
    assert made[0].id == made[1].id
    done = wait_until_ended(client, made[0].id)
    assert done.status == "completed" and done.request_counts.completed == 1  # type: ignore[union-attr]

    retry = httpx.post(
        f"{stack.api_url}/v1/batches/{done.id}/retry", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert retry["retry_of"] == done.id and retry["id"] != done.id
    again = wait_until_ended(client, retry["id"])
    assert again.request_counts.total == 2  # type: ignore[union-attr]
    assert [e["custom_id"] for e in lines_of(client, again.error_file_id)] == ["bad", None]


def test_a_batch_stops_once_it_has_spent_its_max_cost(
    client: OpenAI, stack: Stack, key: str, settings: Settings
) -> None:
    uploaded = client.files.create(
        file=("costly.jsonl", jsonl(slow_lines(32, 40))), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        extra_body={"max_cost": 0.0000001},
    )
    done = wait_until_ended(client, batch.id)
    assert done.status == "cancelled" and done.errors is not None
    assert done.errors.data[0].code == "max_cost_reached"
    time.sleep(2)
    assert_partial_output_and_nothing_after(client, settings, done)
    errors = lines_of(client, done.error_file_id)
    assert {line["error"]["code"] for line in errors} == {"max_cost_reached"}


def test_a_poison_batch_never_holds_up_another_owners_batch(
    client: OpenAI, stack: Stack, settings: Settings, s3_client: Any
) -> None:
    mallory = OpenAI(
        base_url=f"{stack.api_url}/v1", api_key=create_key(stack.env, "mallory"), max_retries=0
    )
    poison = [
        chat_line("nul\x00", "hi"),
        chat_line("x" * 600, "hi"),
        {**chat_line("long-key", "hi"), "k" * 300: 1},
        json.dumps(chat_line("deep", "hi")).encode()[:-1]
        + b', "x": '
        + b"[" * 20_000
        + b"]" * 20_000
        + b"}",
        chat_line("fine", "hi"),
    ]
    poisoned = mallory.files.create(file=("poison.jsonl", jsonl(poison)), purpose="batch")
    lost = mallory.files.create(file=("lost.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    with session_scope(settings.database_url) as session:
        row = session.get(FileObject, lost.id)
        assert row is not None
        s3_client.delete_object(Bucket=BUCKET, Key=f"data/{row.storage_key}")
    bad = [
        mallory.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        for f in (poisoned, lost)
    ]

    started = time.monotonic()
    normal = client.files.create(
        file=("normal.jsonl", jsonl([chat_line(f"n-{i}", "hi") for i in range(3)])),
        purpose="batch",
    )
    batch = client.batches.create(input_file_id=normal.id, endpoint=CHAT, completion_window="24h")
    done = wait_until_ended(client, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 3  # type: ignore[union-attr]
    took = time.monotonic() - started

    poisoned_done = wait_until_ended(mallory, bad[0].id, timeout=60)
    assert poisoned_done.status == "completed"
    errors = lines_of(mallory, poisoned_done.error_file_id)
    assert [line["error"]["line"] for line in errors] == [1, 2, 3, 4]
    lost_done = wait_until_ended(mallory, bad[1].id, timeout=60)
    assert lost_done.status == "failed" and lost_done.errors is not None
    assert lost_done.errors.data[0].code == "file_content_unavailable"
    # A 3-line batch ends within seconds of its last line, poison or not.
    assert took < 30, took
