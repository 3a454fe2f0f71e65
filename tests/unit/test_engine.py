"""The decode loop on the tiny model against Hugging Face `generate` and against itself."""

import random
from pathlib import Path

import pytest
import torch

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage, v1_tokenizer
from worker.engine.decode import NewRow, _Row, generate
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "seven",
    "dogs",
    "ran",
    "past",
    "old",
    "red",
    "barns",
    "under",
    "grey",
    "skies",
]


def random_prompt(loaded: LoadedModel, rng: random.Random, max_words: int = 60) -> list[int]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
    return loaded.tokenizer.encode_chat([ChatMessage("user", text)])


def hf_greedy(loaded: LoadedModel, ids: list[int], max_tokens: int) -> list[int]:
    out = loaded.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=loaded.tokenizer.eos_id,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    return out[:-1] if out and out[-1] == loaded.tokenizer.eos_id else out


def test_greedy_rows_in_a_mixed_batch_match_generate_alone(loaded: LoadedModel) -> None:
    rng = random.Random(3)
    prompts = [random_prompt(loaded, rng) for _ in range(12)]
    params = [
        SamplingParams(max_tokens=rng.randint(1, 24), temperature=0 if i % 3 else 0.9, seed=i + 1)
        for i in range(12)
    ]
    batch = generate(loaded, prompts, params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    assert len(greedy_rows) == 8
    for i in greedy_rows:
        assert batch[i].token_ids == hf_greedy(loaded, prompts[i], params[i].max_tokens), i
        assert batch[i].text == loaded.tokenizer.decode(batch[i].token_ids)


def test_seeded_rows_give_the_same_output_alone_and_in_a_batch_of_32(loaded: LoadedModel) -> None:
    rng = random.Random(11)
    prompts = [random_prompt(loaded, rng) for _ in range(32)]
    params = [
        SamplingParams(
            max_tokens=rng.randint(4, 20),
            temperature=rng.choice([0.5, 0.8, 1.2]) if i < 24 else 0,
            top_p=rng.choice([1.0, 0.9, 0.5]),
            top_k=rng.choice([0, 5, 40]),
            min_p=rng.choice([0.0, 0.05]),
            frequency_penalty=rng.choice([0.0, 0.5]),
            presence_penalty=rng.choice([0.0, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.3]),
            seed=rng.randint(1, 9999999999) if i < 24 else None,
        )
        for i in range(32)
    ]
    batch = generate(loaded, prompts, params)
    seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
    assert len(seeded) >= 20
    for i in seeded:
        alone = generate(loaded, [prompts[i]], [params[i]])[0]
        assert batch[i].token_ids == alone.token_ids, i


def test_a_seed_decides_the_output(loaded: LoadedModel) -> None:
    ids = loaded.tokenizer.encode_chat([ChatMessage("user", "Tell me a story")])
    outputs = {
        tuple(
            generate(loaded, [ids], [SamplingParams(max_tokens=8, temperature=1.0, seed=s)])[
                0
            ].token_ids
        )
        for s in range(1, 6)
    }
    assert len(outputs) > 1  # different seeds, different draws


def test_stop_string_cuts_the_text(loaded: LoadedModel) -> None:
    ids = loaded.tokenizer.encode_chat([ChatMessage("user", "Tell me a story")])
    free = generate(loaded, [ids], [SamplingParams(max_tokens=12, temperature=0)])[0]
    stop = free.text[5:8]
    stopped = generate(loaded, [ids], [SamplingParams(max_tokens=12, temperature=0, stop=(stop,))])[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_context_caps_max_tokens(loaded: LoadedModel) -> None:
    context = loaded.spec.context_length
    ids = [1] + [28705] * (context - 4)
    generation = generate(loaded, [ids], [SamplingParams(max_tokens=50, temperature=0)])[0]
    assert len(generation.token_ids) <= 3
    assert generation.finish_reason in ("length", "stop")


def test_compute_time_is_shared_by_tokens(loaded: LoadedModel) -> None:
    rng = random.Random(5)
    prompts = [random_prompt(loaded, rng, 5), random_prompt(loaded, rng, 60)]
    params = [
        SamplingParams(max_tokens=2, temperature=0),
        SamplingParams(max_tokens=30, temperature=0),
    ]
    short, long = generate(loaded, prompts, params)
    assert 0 < short.compute_seconds < long.compute_seconds


def test_a_dropped_row_stops_at_once_and_its_batch_mates_are_unchanged(
    loaded: LoadedModel,
) -> None:
    rng = random.Random(11)
    prompts = [random_prompt(loaded, rng) for _ in range(3)]
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=5 + i) for i in range(3)]
    alone = generate(loaded, prompts, params)
    steps = 0

    def dropped() -> list[int]:
        nonlocal steps
        steps += 1
        return [1] if steps >= 3 else []

    cut = generate(loaded, prompts, params, dropped=dropped)
    assert cut[1].finish_reason == "cancelled" and len(cut[1].token_ids) == 3
    assert cut[1].token_ids == alone[1].token_ids[:3]
    assert [cut[i].token_ids for i in (0, 2)] == [alone[i].token_ids for i in (0, 2)]


def test_stop_strings_of_byte_fallback_characters_fire() -> None:
    # Math letters and some CJK characters have no piece of their own: each is 3 or 4
    # byte-fallback tokens, so a stop string of two characters spans up to 8 tokens.
    tokenizer = v1_tokenizer()
    for before, stop, after in [("x = ", "𝔸𝔹", " y"), ("ok ", "漢漢", " no"), ("a ", "🙂🙂", "b")]:
        ids = tokenizer.encode(before + stop + after)
        row = _Row(NewRow(0, [1], SamplingParams(max_tokens=64, stop=(stop,))), budget=64)
        for token in ids:
            row.accept(token, tokenizer.eos_id, tokenizer.decode)
            if row.finish is not None:
                break
        assert row.finish == "stop", stop
        assert row.result(tokenizer.decode).text == tokenizer.decode(ids).split(stop)[0]


def test_eos_counts_as_a_completion_token() -> None:
    tokenizer = v1_tokenizer()
    row = _Row(NewRow(0, [1], SamplingParams(max_tokens=8)), budget=8)
    for token in [*tokenizer.encode("Hi there"), tokenizer.eos_id]:
        row.accept(token, tokenizer.eos_id, tokenizer.decode)
    result = row.result(tokenizer.decode)
    assert result.finish_reason == "stop" and tokenizer.eos_id not in result.token_ids
    assert result.completion_tokens == len(result.token_ids) + 1


def test_an_empty_batch_gives_no_results(loaded: LoadedModel) -> None:
    assert generate(loaded, [], []) == []


def test_a_row_that_cannot_be_set_up_fails_alone(loaded: LoadedModel) -> None:
    rng = random.Random(7)
    prompts = [random_prompt(loaded, rng) for _ in range(4)]
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=i) for i in range(4)]
    # A token id outside the vocabulary: the embedding would raise for the whole batch.
    bad = [*prompts[2][:-1], loaded.model.config.vocab_size + 5]
    # A seed beyond 64 bits once overflowed the CPU generator and failed the whole batch.
    huge_seed = SamplingParams(max_tokens=10, temperature=0.8, seed=2**70)
    rows = [*prompts[:2], bad, prompts[3], prompts[0]]
    batch = generate(loaded, rows, [*params[:2], params[2], params[3], huge_seed])
    assert batch[2].finish_reason == "error" and batch[2].token_ids == []
    assert batch[2].error is not None and "vocabulary" in batch[2].error
    for i in (0, 1, 3):
        assert batch[i].token_ids == generate(loaded, [prompts[i]], [params[i]])[0].token_ids, i
    assert batch[4].finish_reason == "length" and len(batch[4].token_ids) == 10
