"""Logprobs from the decode loop on the tiny model, against a plain Hugging Face forward: the
model's own log-probabilities, whatever the row samples with, in any batch, through refills."""

import random
from collections.abc import Hashable
from pathlib import Path

import pytest
import torch

from jobs.errors import InvalidParameter
from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage, v1_tokenizer
from worker.engine.decode import Generation, NewRow, Refill, decode_rows, generate
from worker.engine.loader import LoadedModel, load_model

TOLERANCE = 1e-4
WORDS = ["the", "cat", "sat", "on", "a", "mat", "seven", "dogs", "ran", "past", "old", "barns"]


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def prompt(loaded: LoadedModel, rng: random.Random) -> list[int]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
    return loaded.tokenizer.encode_chat([ChatMessage("user", text)])


def reference(loaded: LoadedModel, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the fp32 logits of one plain forward over the prompt and the tokens:
    row i is the distribution that token i was drawn from."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + tokens])).logits[0].float()
    return torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(tokens)], dim=-1)


def assert_raw_logprobs(loaded: LoadedModel, ids: list[int], result: Generation, top: int) -> None:
    assert result.logprobs is not None
    assert len(result.logprobs) == len(result.token_ids) > 0
    expected = reference(loaded, ids, result.token_ids)
    tokenizer = loaded.tokenizer
    for step, (token, entry) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert entry["bytes"] == list(tokenizer.token_bytes(token))
        assert entry["logprob"] == pytest.approx(expected[step, token].item(), abs=TOLERANCE)
        values = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert len(values) == top
        assert values == sorted(values, reverse=True)
        best = expected[step].topk(top).values.tolist() if top else []
        assert values == pytest.approx(best, abs=TOLERANCE)


def test_logprobs_are_the_raw_models_whatever_the_row_samples_with(loaded: LoadedModel) -> None:
    rng = random.Random(5)
    params = [
        SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=5),
        SamplingParams(
            max_tokens=12,
            temperature=0.8,
            top_p=0.9,
            repetition_penalty=1.3,
            seed=7,
            logprobs=True,
            top_logprobs=20,
        ),
        SamplingParams(
            max_tokens=10, temperature=0, repetition_penalty=1.5, logprobs=True, top_logprobs=1
        ),
        SamplingParams(max_tokens=9, temperature=1.0, top_k=5, seed=3, logprobs=True),
        SamplingParams(max_tokens=8, temperature=0.7, seed=9),
        SamplingParams(max_tokens=8, temperature=0),
    ]
    prompts = [prompt(loaded, rng) for _ in params]
    results = generate(loaded, prompts, params)
    for ids, p, result in zip(prompts, params, results, strict=True):
        if p.logprobs:
            assert_raw_logprobs(loaded, ids, result, p.top_logprobs)
        else:
            assert result.logprobs is None
    # A greedy row without penalties picks the model's best token at every step.
    assert all(e["logprob"] == e["top_logprobs"][0]["logprob"] for e in results[0].logprobs or [])


def test_asking_for_logprobs_changes_no_token(loaded: LoadedModel) -> None:
    rng = random.Random(8)
    prompts = [prompt(loaded, rng) for _ in range(4)]
    plain = [SamplingParams(max_tokens=10, temperature=0.9, seed=i + 1) for i in range(4)]
    asking = [SamplingParams(**{**p.to_dict(), "logprobs": True, "top_logprobs": 3}) for p in plain]
    without = generate(loaded, prompts, plain)
    with_logprobs = generate(loaded, prompts, asking)
    assert [r.token_ids for r in without] == [r.token_ids for r in with_logprobs]


def test_rows_joining_and_leaving_keep_their_own_logprobs(loaded: LoadedModel) -> None:
    rng = random.Random(13)
    params = [
        SamplingParams(
            max_tokens=rng.randint(1, 14),
            temperature=0 if index % 2 else 0.8,
            seed=index + 1,
            logprobs=index % 3 != 2,
            top_logprobs=[0, 2, 0, 5, 1, 0, 3][index % 7] if index % 3 != 2 else 0,
        )
        for index in range(9)
    ]
    rows = [NewRow(index, prompt(loaded, rng), p) for index, p in enumerate(params)]
    results: dict[Hashable, Generation] = {}
    decode_rows(loaded, rows[:3], results.__setitem__, slots=2, refill=_refill(rows[3:]))
    assert sorted(results) == list(range(9))  # type: ignore[type-var]
    for row in rows:
        result = results[row.key]
        if row.params.logprobs:
            assert_raw_logprobs(loaded, list(row.prompt), result, row.params.top_logprobs)
        else:
            assert result.logprobs is None


def _refill(rows: list[NewRow]) -> Refill:
    """Hands out these rows, as many at a time as slots are free."""
    waiting = list(rows)

    def refill(free: int) -> list[NewRow]:
        taken, waiting[:] = waiting[:free], waiting[free:]
        return taken

    return refill


def test_a_row_cut_at_a_stop_string_has_an_entry_per_token(loaded: LoadedModel) -> None:
    rng = random.Random(2)
    ids = prompt(loaded, rng)
    free = generate(loaded, [ids], [SamplingParams(max_tokens=16, temperature=0)])[0]
    stop = loaded.tokenizer.decode(free.token_ids[3:5]).strip()
    assert stop
    params = SamplingParams(max_tokens=16, temperature=0, stop=(stop,), logprobs=True)
    result = generate(loaded, [ids], [params])[0]
    assert result.finish_reason == "stop"
    assert_raw_logprobs(loaded, ids, result, 0)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_sampling_params_refuse_bad_top_logprobs(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        SamplingParams(**values)  # type: ignore[arg-type]
    assert refused.value.param == field


def test_tokens_are_shown_as_openai_shows_them() -> None:
    tokenizer = v1_tokenizer()
    word = tokenizer.encode("Hello")[0]
    assert tokenizer.token_logprob(word, -0.5) == {
        "token": " Hello",
        "logprob": -0.5,
        "bytes": list(b" Hello"),
    }
    # A byte-fallback token is its one byte; alone, it is not a whole character.
    first_byte = tokenizer.encode("\U0001d538")[1]
    assert tokenizer.token_logprob(first_byte, -1.0) == {
        "token": "\ufffd",
        "logprob": -1.0,
        "bytes": [0xF0],
    }
    assert tokenizer.token_logprob(tokenizer.eos_id, 0.0)["token"] == "</s>"
