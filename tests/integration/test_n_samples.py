"""A job of n samples against real Postgres: recorded once with its usage, cost and choices,
shown by the API and in batch output lines; n out of range refused."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import queries
from jobs.batches.lines import InvalidLine, LineChecker
from jobs.batches.output_format import output_line
from jobs.db import get_session_factory
from jobs.models import CacheEntry
from jobs.pricing import price
from jobs.queue import InProcessQueue
from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.schemas.jobs import choice_texts, job_public
from jobs.schemas.openai import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT
from jobs.settings import Settings
from jobs.storage import LocalStorage, sample_result_key
from tests.factories import make_job
from tests.integration.test_api_validation import assert_error, post
from worker.claims import ClaimedRow
from worker.engine.decode import Generation
from worker.results import Results
from worker.services import Services


def sample(text: str, tokens: int, finish: str = "stop") -> Generation:
    return Generation(
        token_ids=list(range(tokens - 1)),
        text=text,
        finish_reason=finish,
        compute_seconds=0.5,
        completion_tokens=tokens,
    )


def three_samples(large: str) -> Generation:
    samples = [sample("first", 4), sample(large, 7, "length"), sample("third", 2)]
    return replace(samples[0], samples=samples)


def results_for(settings: Settings, storage: LocalStorage) -> Results:
    factory = get_session_factory(settings.database_url)

    @contextmanager
    def session_scope() -> Iterator[Session]:
        db = factory()
        try:
            yield db
        finally:
            db.close()

    services = Services(settings, session_scope, storage, InProcessQueue())
    return Results(services, resolve_model(settings.model))


def test_n_samples_are_recorded_once_with_usage_cost_and_choices(
    api_settings: Settings, session: Session, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    large = "long " * 20_000  # over result_inline_max_bytes: kept in storage
    job = make_job(session, api_settings, prompt="Hello", seed=5, n=3, cache=True)
    [claim] = queries.claim_batch(session, job.model, "w", 60, 1, first_id=job.id)
    row = ClaimedRow(claim, [1, 2, 3, 4, 5], SamplingParams.from_dict(claim.job.sampling))
    results = results_for(api_settings, storage)
    generation = three_samples(large)
    assert results.record(row, generation)
    assert not results.record(row, generation)  # recorded once: the claim is spent
    session.refresh(job)
    # The prompt counts once, every sample's tokens count.
    assert job.completion_tokens == 4 + 7 + 2
    cost = price(resolve_model(api_settings.model), len(row.prompt), 13)
    assert (job.cost_input, job.cost_output) == (cost.input, cost.output)
    assert job.response_text == "first" and job.finish_reason == "stop"
    assert job.choices == [
        {
            "uri": sample_result_key(job.id, 1),
            "finish_reason": "length",
            "completion_tokens": 7,
            "logprobs": None,
        },
        {"text": "third", "finish_reason": "stop", "completion_tokens": 2, "logprobs": None},
    ]
    assert choice_texts(job, storage) == [large, "third"]
    public = job_public(job, storage).model_dump(mode="json")
    assert [choice["response"] for choice in public["result"]["choices"]] == [
        "first",
        large,
        "third",
    ]
    assert public["result"]["response"] == "first"
    # n > 1 is not cached (an entry holds one answer), though the seeded job has a key.
    assert job.cache_key is not None
    assert session.scalar(select(CacheEntry).where(CacheEntry.key == job.cache_key)) is None


def test_one_sample_shows_nothing_new(
    api_settings: Settings, session: Session, tmp_path: Path
) -> None:
    job = make_job(session, api_settings, prompt="Hello")
    [claim] = queries.claim_batch(session, job.model, "w", 60, 1, first_id=job.id)
    outcome = queries.Outcome(3, "stop", "only", None, 0, 0, 0.1)  # type: ignore[arg-type]
    assert queries.record_success(session, claim, outcome)
    session.refresh(job)
    assert job.choices is None and "n" not in job.sampling
    public = job_public(job, LocalStorage(tmp_path)).model_dump(mode="json")
    assert "choices" not in public["result"]


def test_output_lines_have_a_choice_per_sample(api_settings: Settings, session: Session) -> None:
    job = make_job(session, api_settings, prompt="Hello", seed=5, n=2, logprobs=True)
    entries = [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]
    job.response_text, job.finish_reason, job.completion_tokens = "zero", "stop", 3
    job.logprobs = entries
    job.choices = [
        {"text": "one", "finish_reason": "length", "completion_tokens": 2, "logprobs": entries}
    ]
    chat = output_line(job, "zero", CHAT_ENDPOINT)["response"]["body"]["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat] == [
        (0, "zero", "stop"),
        (1, "one", "length"),
    ]
    assert chat[1]["logprobs"] == {"content": entries}
    text = output_line(job, "zero", COMPLETIONS_ENDPOINT)["response"]["body"]["choices"]
    assert [(c["index"], c["text"]) for c in text] == [(0, "zero"), (1, "one")]
    assert text[1]["logprobs"]["tokens"] == ["a"]
    session.rollback()


def test_n_out_of_range_is_422_naming_n(client: TestClient, alice: dict[str, str]) -> None:
    for bad in (0, 17, "2", 2.5):
        assert_error(post(client, alice, {"prompt": "Hi", "max_tokens": 4, "n": bad}), 422, "n")
    assert post(client, alice, {"prompt": "Hi", "max_tokens": 4, "n": 16}).status_code == 202


def test_a_batch_line_with_a_bad_n_fails_alone(api_settings: Settings) -> None:
    checker = LineChecker(CHAT_ENDPOINT, api_settings, adapter_id=None)

    def line(number: int, n: Any) -> Any:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": n}
        data = {"custom_id": f"r{number}", "method": "POST", "url": CHAT_ENDPOINT, "body": body}
        return checker.check(number, json.dumps(data).encode())

    for number, bad in enumerate((0, 17, "3"), start=1):
        refused = line(number, bad)
        assert isinstance(refused, InvalidLine), bad
        assert refused.param == "body.n" and refused.line == number
        assert refused.message.startswith(f"line {number}:")
    assert line(9, 3).prepared.sampling.n == 3


def test_a_dry_run_counts_every_sample_of_a_line(client: TestClient, alice: dict[str, str]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lines = [
        {"custom_id": "one", "method": "POST", "url": CHAT_ENDPOINT, "body": body},
        {"custom_id": "three", "method": "POST", "url": CHAT_ENDPOINT, "body": {**body, "n": 3}},
    ]
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", "\n".join(json.dumps(line) for line in lines).encode())},
        data={"purpose": "batch"},
        headers=alice,
    ).json()
    request = {"input_file_id": uploaded["id"], "endpoint": CHAT_ENDPOINT, "dry_run": True}
    estimate = client.post("/v1/batches", json=request, headers=alice)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["max_completion_tokens"] == 5 + 3 * 5
