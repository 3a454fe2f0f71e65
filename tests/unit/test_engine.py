"""The decode loop on the tiny model: greedy equals Hugging Face `generate`."""

from pathlib import Path

import pytest
import torch

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


PROMPTS = ["Tell me a story", "hi", "What is the capital of France? Answer in one word please."]


def test_greedy_rows_match_generate_alone(loaded: LoadedModel) -> None:
    prompts = [loaded.tokenizer.encode_chat([ChatMessage("user", p)]) for p in PROMPTS]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (12, 20, 7)]
    batch = generate(loaded, prompts, params)
    for ids, p, generation in zip(prompts, params, batch, strict=True):
        reference = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=p.max_tokens, do_sample=False
        )[0, len(ids) :].tolist()
        assert generation.token_ids == reference
        assert generation.finish_reason == "length"
        assert generation.text == loaded.tokenizer.decode(reference)


def test_stop_string_cuts_the_text(loaded: LoadedModel) -> None:
    ids = loaded.tokenizer.encode_chat([ChatMessage("user", PROMPTS[0])])
    free = generate(loaded, [ids], [SamplingParams(max_tokens=12, temperature=0)])[0]
    stop = free.text[5:8]
    stopped = generate(loaded, [ids], [SamplingParams(max_tokens=12, temperature=0, stop=(stop,))])[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]


def test_seeded_row_gives_the_same_tokens_alone_and_in_a_batch(loaded: LoadedModel) -> None:
    prompts = [loaded.tokenizer.encode_chat([ChatMessage("user", p)]) for p in PROMPTS]
    seeded = SamplingParams(max_tokens=10, temperature=0.8, seed=1234)
    alone = generate(loaded, [prompts[1]], [seeded])[0]
    others = [
        SamplingParams(max_tokens=15, temperature=1.0),
        SamplingParams(max_tokens=5, temperature=0),
    ]
    batched = generate(loaded, [prompts[0], prompts[1], prompts[2]], [others[0], seeded, others[1]])
    assert batched[1].token_ids == alone.token_ids


def test_context_caps_max_tokens(loaded: LoadedModel) -> None:
    context = loaded.spec.context_length
    ids = [1] + [28705] * (context - 4)
    generation = generate(loaded, [ids], [SamplingParams(max_tokens=50, temperature=0)])[0]
    assert len(generation.token_ids) <= 3
    assert generation.finish_reason in ("length", "stop")
