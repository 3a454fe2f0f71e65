"""The result cache through the whole stack (API and worker processes, Postgres, Redis, S3),
driven by the official `openai` SDK: a seeded file run twice with `"cache": true` is decoded
once; the second batch is answered from the cache, line for line, at no cost and without the
worker; another owner's identical file runs."""

import uuid
from typing import Any

import httpx
import pytest
from openai import OpenAI
from sqlalchemy import select

from jobs.db import session_scope
from jobs.models import Job, JobStatus
from jobs.settings import Settings
from tests.conftest import Stack, create_key
from tests.e2e.test_batches import chat_line, jsonl, lines_of, wait_until_ended

LINES = 50


@pytest.fixture(scope="module")
def client(stack: Stack) -> OpenAI:
    key = create_key(stack.env, "cache-owner")
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def other_client(stack: Stack) -> OpenAI:
    key = create_key(stack.env, "cache-other")
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


def seeded_file() -> bytes:
    """Short seeded lines that sample (so the seed is what makes them deterministic)."""
    tag = uuid.uuid4().hex[:8]
    return jsonl(
        [
            chat_line(
                f"line-{n}", f"Cached {tag} {n}", max_tokens=4 + n % 5, temperature=0.8, seed=n
            )
            for n in range(1, LINES + 1)
        ]
    )


def run_batch(client: OpenAI, data: bytes) -> tuple[Any, dict[str, dict[str, Any]]]:
    uploaded = client.files.create(file=("seeded.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"cache": True},
    )
    done = wait_until_ended(client, batch.id)
    assert done.status == "completed", done
    outputs = lines_of(client, done.output_file_id)
    assert len(outputs) == LINES
    return done, {line["custom_id"]: line["response"]["body"] for line in outputs}


def shown(client: OpenAI, batch_id: str) -> dict[str, Any]:
    """The batch as its GET returns it, mbatch's own fields included."""
    headers = {"Authorization": f"Bearer {client.api_key}"}
    response = httpx.get(f"{client.base_url}batches/{batch_id}", headers=headers)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def lines_run_by_a_worker(settings: Settings, batch_id: str) -> list[Job]:
    with session_scope(settings.database_url) as session:
        jobs = list(session.scalars(select(Job).where(Job.batch_id == batch_id)))
        session.expunge_all()
    assert len(jobs) == LINES and all(job.status == JobStatus.succeeded for job in jobs)
    return [job for job in jobs if job.claimed_by is not None or job.attempts > 0]


def test_a_seeded_file_run_twice_is_decoded_once(
    client: OpenAI, other_client: OpenAI, settings: Settings
) -> None:
    data = seeded_file()
    first, decoded = run_batch(client, data)
    assert not any("cached" in body for body in decoded.values())
    assert len(lines_run_by_a_worker(settings, first.id)) == LINES
    assert shown(client, first.id)["usage"]["estimated_cost"] > 0

    second, answered = run_batch(client, data)
    second_shown = shown(client, second.id)
    assert second_shown["cache"] is True
    assert answered.keys() == decoded.keys()
    assert all(body["cached"] is True for body in answered.values())
    for custom_id, body in answered.items():
        assert body["choices"] == decoded[custom_id]["choices"]
        assert body["usage"]["prompt_tokens"] == decoded[custom_id]["usage"]["prompt_tokens"]
        assert (
            body["usage"]["completion_tokens"] == decoded[custom_id]["usage"]["completion_tokens"]
        )
        assert body["usage"]["estimated_cost"] == 0
    # No line of the second batch reached the worker: nothing was decoded for it.
    assert lines_run_by_a_worker(settings, second.id) == []
    assert second_shown["usage"]["estimated_cost"] == 0
    assert second_shown["usage"]["completion_tokens"] == sum(
        body["usage"]["completion_tokens"] for body in decoded.values()
    )

    # Another owner's identical file: their cache is empty, and every line runs.
    theirs, theirs_answered = run_batch(other_client, data)
    assert not any("cached" in body for body in theirs_answered.values())
    assert len(lines_run_by_a_worker(settings, theirs.id)) == LINES
