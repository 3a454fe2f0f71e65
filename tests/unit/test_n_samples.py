"""`n` samples of one prompt: one prefill, then n rows that decode apart, each with its own seed."""

import json
import random
from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.errors import InvalidParameter
from jobs.registry import resolve_model
from jobs.response_format import schema_text
from jobs.sampling import SamplingParams, sample_seed
from jobs.settings import Settings
from tests.unit.test_engine import random_prompt
from worker.engine import decode
from worker.engine.decode import CANCELLED, FAILED, Generation, NewRow, decode_rows, generate
from worker.engine.kv_cache import SlotCache
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def tokens_of(generation: Generation) -> list[list[int]]:
    assert generation.samples is not None
    return [sample.token_ids for sample in generation.samples]


def test_n_is_checked() -> None:
    for bad in (0, 17, True, 2.0):
        with pytest.raises(InvalidParameter) as raised:
            SamplingParams(n=bad)  # type: ignore[arg-type]
        assert raised.value.param == "n"
    assert SamplingParams(n=16).n == 16
    # Stored as before n existed where it is 1, so that a job's cache key is unchanged.
    assert "n" not in SamplingParams().to_dict() and SamplingParams(n=3).to_dict()["n"] == 3
    assert SamplingParams.from_dict(SamplingParams(n=3).to_dict()).n == 3


def test_sample_seeds_differ_and_sample_0_keeps_the_seed() -> None:
    assert sample_seed(7, 0) == 7
    seeds = {sample_seed(7, index) for index in range(16)}
    assert len(seeds) == 16 and all(0 <= seed < 2**64 for seed in seeds)


def test_n_samples_differ_are_reproducible_and_sample_0_is_the_row_alone(
    loaded: LoadedModel,
) -> None:
    prompt = random_prompt(loaded, random.Random(1))
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42, n=4)
    first, again = generate(loaded, [prompt], [params]), generate(loaded, [prompt], [params])
    samples = tokens_of(first[0])
    assert len(samples) == 4 and len({tuple(tokens) for tokens in samples}) == 4
    assert samples == tokens_of(again[0])
    # The Generation's own fields are sample 0's, which is the row with n=1.
    alone = generate(loaded, [prompt], [SamplingParams(max_tokens=16, temperature=1.0, seed=42)])
    assert first[0].token_ids == samples[0] == alone[0].token_ids
    assert alone[0].samples is None
    # Sample i is the row with n=1 and the seed derived for it.
    for index in range(1, 4):
        own = SamplingParams(max_tokens=16, temperature=1.0, seed=sample_seed(42, index))
        assert generate(loaded, [prompt], [own])[0].token_ids == samples[index], index


def test_unseeded_samples_differ(loaded: LoadedModel) -> None:
    prompt = random_prompt(loaded, random.Random(2))
    result = generate(loaded, [prompt], [SamplingParams(max_tokens=12, temperature=1.0, n=3)])
    assert len({tuple(tokens) for tokens in tokens_of(result[0])}) == 3


def mixed_rows(loaded: LoadedModel) -> list[NewRow]:
    rng = random.Random(5)
    ns = [4, 1, 3, 1, 2, 1, 3]
    return [
        NewRow(
            f"row-{index}",
            random_prompt(loaded, rng, 40),
            SamplingParams(max_tokens=rng.randint(2, 14), temperature=1.0, seed=index + 1, n=n),
        )
        for index, n in enumerate(ns)
    ]


def run_alone(loaded: LoadedModel, row: NewRow) -> Generation:
    results: dict[Hashable, Generation] = {}
    decode_rows(loaded, [row], results.__setitem__)
    return results[row.key]


def test_samples_in_a_mixed_batch_with_refill_are_as_alone(loaded: LoadedModel) -> None:
    rows = mixed_rows(loaded)
    alone = {row.key: run_alone(loaded, row) for row in rows}
    finished: dict[Hashable, Generation] = {}

    def on_finish(key: Hashable, generation: Generation) -> None:
        assert key not in finished  # one result per key
        finished[key] = generation

    queue = rows[3:]

    def refill(free: int) -> list[NewRow]:
        nonlocal queue
        taken, queue = queue[:free], queue[free:]
        return taken

    # 5 slots for 15 samples: rows wait for room, and join by refill as others end.
    decode_rows(loaded, rows[:3], on_finish, slots=5, refill=refill)
    assert set(finished) == {row.key for row in rows}
    for row in rows:
        got, want = finished[row.key], alone[row.key]
        assert got.token_ids == want.token_ids, row.key
        if row.params.n > 1:
            assert tokens_of(got) == tokens_of(want), row.key
            assert len(tokens_of(got)) == row.params.n
        else:
            assert got.samples is None


def test_the_prompt_is_prefilled_once(loaded: LoadedModel, monkeypatch: Any) -> None:
    prefilled: list[int] = []
    model_step = decode._model_step

    def counting(*args: Any) -> torch.Tensor:
        cache = args[-1]
        if isinstance(cache, SlotCache) and cache.prefill_slots is not None:
            prefilled.append(args[2].shape[1])  # the prefill's width: one prompt, unpadded
        return model_step(*args)

    monkeypatch.setattr(decode, "_model_step", counting)
    prompt = random_prompt(loaded, random.Random(3))
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=9, n=4)
    result = generate(loaded, [prompt], [params])
    assert prefilled == [len(prompt)]
    assert len(tokens_of(result[0])) == 4


def test_cancelling_the_key_stops_every_sample(loaded: LoadedModel) -> None:
    prompts = [random_prompt(loaded, random.Random(seed)) for seed in (4, 5)]
    params = [
        SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=3),
        SamplingParams(max_tokens=30, temperature=1.0, seed=4),
    ]
    alone = generate(loaded, prompts, params)
    steps = 0

    def dropped() -> list[int]:
        nonlocal steps
        steps += 1
        return [0] if steps >= 3 else []

    cut = generate(loaded, prompts, params, dropped=dropped)
    assert cut[0].finish_reason == CANCELLED and cut[0].samples is not None
    assert all(sample.finish_reason in (CANCELLED, "stop") for sample in cut[0].samples)
    assert [len(sample.token_ids) <= 3 for sample in cut[0].samples] == [True] * 3
    assert cut[1].token_ids == alone[1].token_ids


def test_more_samples_than_slots_fail_alone(loaded: LoadedModel) -> None:
    rows = [
        NewRow("big", [1, 2, 3], SamplingParams(max_tokens=3, n=3)),
        NewRow("small", [1, 2, 3], SamplingParams(max_tokens=3)),
    ]
    results: dict[Hashable, Generation] = {}
    decode_rows(loaded, rows, results.__setitem__, slots=2)
    assert results["big"].finish_reason == FAILED and "slots" in (results["big"].error or "")
    assert results["small"].finish_reason == "length"


def test_logprobs_and_response_format_are_per_sample(loaded: LoadedModel) -> None:
    prompt = random_prompt(loaded, random.Random(6))
    params = SamplingParams(
        max_tokens=60,
        temperature=1.0,
        seed=11,
        n=3,
        logprobs=True,
        top_logprobs=2,
        response_format=schema_text({"type": "json_object"}),
    )
    result = generate(loaded, [prompt], [params])[0]
    assert result.samples is not None and len(result.samples) == 3
    for index, sample in enumerate(result.samples):
        assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
        assert all(len(entry["top_logprobs"]) == 2 for entry in sample.logprobs)
        if sample.finish_reason == "stop":
            assert isinstance(json.loads(sample.text), dict), index
        own = replace(params, n=1, seed=sample_seed(11, index))
        alone = generate(loaded, [prompt], [own])[0]
        assert alone.token_ids == sample.token_ids, index
        # The same values, up to float rounding: one row alone, against three in a batch.
        assert alone.logprobs is not None
        assert [entry["token"] for entry in alone.logprobs] == [
            entry["token"] for entry in sample.logprobs
        ]
        assert [entry["logprob"] for entry in alone.logprobs] == pytest.approx(
            [entry["logprob"] for entry in sample.logprobs], abs=1e-4
        )


def test_a_copied_slot_holds_its_source_and_nothing_of_its_last_row(loaded: LoadedModel) -> None:
    cache = SlotCache(
        loaded.model.config, slots=3, max_len=8, dtype=torch.float32, device=loaded.device
    )
    for layer in cache.slot_layers:
        assert layer.keys is not None and layer.values is not None
        layer.keys.copy_(torch.randn_like(layer.keys))
        layer.values.copy_(torch.randn_like(layer.values))
    cache.written = [8, 8, 8]
    cache.plan_prefill([0], width=3)  # slot 0: a fresh prefill of 3 columns, zero beyond
    cache.copy([0, 0], [1, 2], columns=3)
    assert cache.written == [3, 3, 3]
    for layer in cache.slot_layers:
        for tensor in (layer.keys, layer.values):
            assert tensor is not None
            assert torch.equal(tensor[1], tensor[0]) and torch.equal(tensor[2], tensor[0])
            assert not tensor[:, :, 3:].any()
