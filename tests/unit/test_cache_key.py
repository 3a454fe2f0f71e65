"""The result cache's key and what it caches: one key for one request as the worker would
decode it, another for anything that could change the answer; only deterministic requests;
and the `cached` mark on an output line."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from jobs.batches.output_format import response_body
from jobs.cache import cache_key, is_deterministic
from jobs.models import Job
from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.schemas.openai import CHAT_ENDPOINT

MODEL = "tiny-random-mistral"
INPUT = {"messages": [{"role": "user", "content": "Name a colour."}]}


def sampling(**values: Any) -> dict[str, Any]:
    return SamplingParams.resolve(resolve_model(MODEL), **values).to_dict()


def key(**changes: Any) -> str:
    parts: dict[str, Any] = {
        "model": MODEL,
        "adapter_sha256": None,
        "job_input": INPUT,
        "sampling": sampling(temperature=0, max_tokens=8),
        **changes,
    }
    return cache_key(**parts)


def test_the_same_request_has_the_same_key_whatever_the_order_of_its_fields() -> None:
    reordered = dict(reversed(list(sampling(temperature=0, max_tokens=8).items())))
    assert key() == key(sampling=reordered) == key(job_input=dict(INPUT))
    assert len(key()) == 64 and int(key(), 16) >= 0


def test_an_integer_and_a_float_of_the_same_value_are_the_same_request() -> None:
    assert key(sampling=sampling(temperature=0, max_tokens=8)) == key(
        sampling=sampling(temperature=0.0, max_tokens=8)
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "mistral-7b-instruct-v0.2"},
        {"adapter_sha256": "a" * 64},
        {"job_input": {"messages": [{"role": "user", "content": "Name a color."}]}},
        {"job_input": {"prompt": "Name a colour.", "raw": False}},
        {"sampling": sampling(temperature=0, max_tokens=9)},
        {"sampling": sampling(temperature=0, max_tokens=8, seed=1)},
        {"sampling": sampling(temperature=0, max_tokens=8, stop=["."])},
        {"sampling": sampling(temperature=0, max_tokens=8, logprobs=True)},
    ],
)
def test_anything_that_could_change_the_answer_changes_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


def test_another_adapter_or_seed_is_another_key() -> None:
    assert key(adapter_sha256="a" * 64) != key(adapter_sha256="b" * 64)
    seeded = {"temperature": 0.7, "max_tokens": 8}
    assert key(sampling=sampling(**seeded, seed=1)) != key(sampling=sampling(**seeded, seed=2))


@pytest.mark.parametrize(
    ("values", "deterministic"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "seed": 5}, True),
        ({"temperature": 0.7, "seed": 5}, True),
        ({"temperature": 0.7}, False),
        ({}, False),  # the model's default temperature samples
    ],
)
def test_only_greedy_or_seeded_requests_are_deterministic(
    values: dict[str, Any], deterministic: bool
) -> None:
    assert is_deterministic(sampling(**values)) is deterministic


def job(cached: bool) -> Job:
    return Job(
        id="job_" + "0" * 24,
        model=MODEL,
        input=INPUT,
        prompt_tokens=5,
        completion_tokens=3,
        finish_reason="stop",
        cost_input=Decimal(0),
        cost_output=Decimal(0),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        cached=cached,
    )


def test_an_answer_from_the_cache_says_so_beside_its_usage() -> None:
    body = response_body(job(cached=True), "Blue.", CHAT_ENDPOINT)
    assert body["cached"] is True
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["estimated_cost"] == 0
    assert "cached" not in response_body(job(cached=False), "Blue.", CHAT_ENDPOINT)
