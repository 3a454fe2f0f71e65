"""The whole path on real parts: `mbatch api` and `mbatch worker` as separate processes, with
Postgres, Redis and an S3 server."""

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as ReferenceTokenizer

from jobs.db import session_scope
from jobs.models import Job
from jobs.pricing import price
from jobs.queries import expired_claims
from jobs.queue import CeleryJobQueue
from jobs.registry import resolve_model
from jobs.settings import Settings
from tests import services
from tests.conftest import BUCKET, Stack, create_key

FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def key(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key(stack.env, 'carol')}"}


def submit(stack: Stack, key: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=key)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_for_status(
    stack: Stack, key: dict[str, str], job_id: str, statuses: set[str], timeout: float = 90
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(httpx.get(f"{stack.api_url}/v1/jobs/{job_id}", headers=key).json())
        return found["status"] in statuses

    services.wait_for(reached, timeout, f"job {job_id} to reach {statuses}", interval=0.05)
    return found


def test_a_chat_job_runs_end_to_end(
    stack: Stack, key: dict[str, str], settings: Settings, s3_client: Any
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    job = submit(
        stack, key, {"messages": messages, "max_tokens": 12, "seed": 5, "metadata": {"run": "e2e"}}
    )
    assert job["status"] == "queued" and job["id"].startswith("job_")
    done = wait_for_status(stack, key, job["id"], FINISHED)

    assert done["status"] == "succeeded", done
    assert done["result"]["response"].strip()
    expected_prompt = len(
        ReferenceTokenizer.v1()
        .encode_chat_completion(
            ChatCompletionRequest(
                messages=[
                    SystemMessage(content="You are terse."),
                    UserMessage(content="Name a colour."),
                ]
            )
        )
        .tokens
    )
    usage = done["usage"]
    assert usage["prompt_tokens"] == expected_prompt
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    cost = price(
        resolve_model("tiny-random-mistral"), usage["prompt_tokens"], usage["completion_tokens"]
    )
    assert Decimal(str(done["cost"]["input"])) == cost.input
    assert Decimal(str(done["cost"]["output"])) == cost.output
    assert done["cost"]["currency"] == "USD"
    assert done["metadata"] == {"run": "e2e"}
    assert done["finish_reason"] in ("stop", "length")
    assert done["started_at"] and done["finished_at"]
    assert done["compute_seconds"] > 0

    with session_scope(settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.owner == "carol" and row.status.value == "succeeded"
        assert row.response_uri == f"results/{job['id']}.txt"
        key_in_bucket = f"data/{row.response_uri}"
    stored = s3_client.get_object(Bucket=BUCKET, Key=key_in_bucket)["Body"].read().decode()
    assert stored == done["result"]["response"]


def test_the_same_message_twice_records_one_result(
    stack: Stack, key: dict[str, str], settings: Settings
) -> None:
    job = submit(stack, key, {"prompt": "Say hi", "max_tokens": 8, "temperature": 0})
    first = wait_for_status(stack, key, job["id"], FINISHED)
    assert first["status"] == "succeeded" and first["attempts"] == 1

    queue = CeleryJobQueue(settings)
    queue.publish(job["id"], resolve_model("tiny-random-mistral").queue)
    queue.publish(job["id"], resolve_model("tiny-random-mistral").queue)
    # A later job's message is consumed after the repeated ones.
    later = submit(stack, key, {"prompt": "Say bye", "max_tokens": 4})
    assert wait_for_status(stack, key, later["id"], FINISHED)["status"] == "succeeded"

    again = httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}", headers=key).json()
    assert again["attempts"] == 1
    assert again["finished_at"] == first["finished_at"]
    assert again["result"] == first["result"]


def test_another_key_gets_404_and_no_key_401(stack: Stack, key: dict[str, str]) -> None:
    job = submit(stack, key, {"prompt": "Mine", "max_tokens": 2})
    other = {"Authorization": f"Bearer {create_key(stack.env, 'dave')}"}
    assert httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}").status_code == 401


def test_a_killed_workers_job_is_found_and_run_again(
    stack: Stack, key: dict[str, str], settings: Settings
) -> None:
    # Long enough that the worker is surely mid-decode when it is killed.
    job = submit(stack, key, {"prompt": "Count", "max_tokens": 1500, "temperature": 0})
    running = wait_for_status(stack, key, job["id"], {"running"} | FINISHED)
    assert running["status"] == "running", "the job finished before the worker could be killed"
    stack.worker.kill()

    def found_by_query() -> bool:
        with session_scope(settings.database_url) as session:
            return job["id"] in {j.id for j in expired_claims(session)}

    services.wait_for(found_by_query, 30, "the dead worker's claim to expire")
    assert (
        httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}", headers=key).json()["status"] == "running"
    )

    stack.worker = services.start_worker(stack.env, stack.log_dir)
    done = wait_for_status(stack, key, job["id"], FINISHED, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert datetime.fromisoformat(done["finished_at"]) > datetime.fromisoformat(
        running["started_at"]
    )


def test_jobs_of_different_clients_share_one_batch(
    stack: Stack, key: dict[str, str], settings: Settings
) -> None:
    other = {"Authorization": f"Bearer {create_key(stack.env, 'erin')}"}
    # Both clients' jobs come due together: however the requests interleave, they are queued
    # by one maintenance pass, and a worker must put them in one batch.
    due = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    bodies = [
        {"prompt": f"Question {i}", "max_tokens": 6, "seed": i + 1, "run_at": due} for i in range(4)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = list(
            pool.map(
                lambda pair: submit(stack, pair[0], pair[1]),
                [(client, body) for body in bodies for client in (key, other)],
            )
        )
    assert {job["status"] for job in jobs} == {"scheduled"}
    for job, client in zip(jobs, [key, other] * 4, strict=True):
        assert wait_for_status(stack, client, job["id"], FINISHED)["status"] == "succeeded"
    with session_scope(settings.database_url) as session:
        rows = [session.get(Job, job["id"]) for job in jobs]
        assert {row.owner for row in rows if row} == {"carol", "erin"}
        assert len({row.group_id for row in rows if row}) == 1


def test_cancelled_jobs_stop_decoding_at_once_and_free_the_worker(
    stack: Stack, key: dict[str, str]
) -> None:
    story = {"prompt": "Tell a very long story.", "max_tokens": 4000, "temperature": 1.0}
    long = [submit(stack, key, {**story, "seed": 100 + n}) for n in range(8)]
    wait_for_status(stack, key, long[0]["id"], {"running"})
    time.sleep(1)  # well into decoding: 8 rows of 4,000 tokens take minutes here
    stopped = []
    for job in long:
        cancelled = httpx.post(f"{stack.api_url}/v1/jobs/{job['id']}/cancel", headers=key)
        if cancelled.status_code == 409:  # its row sampled EOS early and it finished
            continue
        assert cancelled.json()["status"] == "cancelled"
        stopped.append(job)
    assert stopped
    started = time.monotonic()
    short = submit(stack, key, {"prompt": "Hi", "max_tokens": 2})
    done = wait_for_status(stack, key, short["id"], FINISHED)
    took = time.monotonic() - started
    assert done["status"] == "succeeded"
    assert took < 20, f"the next job waited {took:.1f} s behind cancelled rows"
    # With refill the short job can join the running batch and end before the lease timer
    # notices the cancellations, so the stopped rows are waited for, within the same bound.
    services.wait_for(
        lambda: "cancelled or reclaimed mid-decode" in stack.worker.output(),
        20,
        "the cancelled rows to leave the batch",
    )
    for job in stopped:
        shown = httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}", headers=key).json()
        assert shown["status"] == "cancelled" and shown["result"] is None
