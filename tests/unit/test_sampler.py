"""Each sampling parameter against a small reference on fixed logits."""

from dataclasses import fields, replace

import torch

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.schemas.native import JobCreate
from jobs.schemas.openai import ChatCompletionBody
from worker.engine.sampler import SamplingTensors, apply_penalties, filtered_probs, sample

VOCAB = 6
LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]])


def tensors(**params: object) -> SamplingTensors:
    return SamplingTensors.from_params([SamplingParams(**params)], VOCAB, torch.device("cpu"))  # type: ignore[arg-type]


def kept(**params: object) -> set[int]:
    probs = filtered_probs(LOGITS, tensors(**params))
    assert abs(float(probs.sum()) - 1) < 1e-5
    return {i for i in range(VOCAB) if probs[0, i] > 0}


def no_history() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((1, VOCAB), dtype=torch.bool), torch.zeros((1, VOCAB), dtype=torch.int32)


def test_top_k_one_equals_greedy() -> None:
    seen, counts = no_history()
    for seed in range(1, 30):
        token = sample(LOGITS, seen, counts, tensors(temperature=1.5, top_k=1, seed=seed))
        assert int(token) == 4


def test_temperature_zero_is_argmax() -> None:
    seen, counts = no_history()
    assert int(sample(LOGITS, seen, counts, tensors(temperature=0))) == 4


def test_top_k_keeps_the_k_largest() -> None:
    assert kept(temperature=1.0, top_k=3) == {4, 0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.softmax(LOGITS[0], dim=-1)
    order = probs.argsort(descending=True).tolist()
    cumulative = probs[order].cumsum(0)
    for top_p in (0.3, 0.6, 0.8, 0.95, 1.0):
        count = int((cumulative < top_p).sum()) + 1
        assert kept(temperature=1.0, top_p=top_p) == set(order[: min(count, VOCAB)])


def test_min_p_keeps_tokens_above_a_fraction_of_the_best() -> None:
    probs = torch.softmax(LOGITS[0], dim=-1)
    for min_p in (0.05, 0.2, 0.5):
        expected = {i for i in range(VOCAB) if probs[i] >= min_p * probs.max()}
        assert kept(temperature=1.0, min_p=min_p) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    seen = torch.tensor([[True, False, False, True, False, False]])
    counts = torch.zeros((1, VOCAB), dtype=torch.int32)
    out = apply_penalties(LOGITS, seen, counts, tensors(repetition_penalty=2.0))
    assert out[0, 0] == 1.0  # 2.0 / 2
    assert out[0, 3] == -2.0  # -1.0 * 2
    assert torch.equal(out[0, [1, 2, 4, 5]], LOGITS[0, [1, 2, 4, 5]])


def test_frequency_and_presence_penalties_subtract_per_count_and_once() -> None:
    seen, _ = no_history()
    counts = torch.tensor([[3, 0, 1, 0, 0, 0]], dtype=torch.int32)
    out = apply_penalties(
        LOGITS, seen, counts, tensors(frequency_penalty=0.5, presence_penalty=0.25)
    )
    assert out[0, 0] == 2.0 - 0.5 * 3 - 0.25
    assert out[0, 2] == 0.5 - 0.5 * 1 - 0.25
    assert torch.equal(out[0, [1, 3, 4, 5]], LOGITS[0, [1, 3, 4, 5]])


def test_seeded_draws_repeat_and_follow_the_distribution() -> None:
    seen, counts = no_history()
    draws = [
        int(sample(LOGITS, seen, counts, tensors(temperature=1.0, seed=s))) for s in range(1, 2001)
    ]
    again = [
        int(sample(LOGITS, seen, counts, tensors(temperature=1.0, seed=s))) for s in range(1, 2001)
    ]
    assert draws == again
    probs = torch.softmax(LOGITS[0], dim=-1)
    for token in range(VOCAB):
        assert abs(draws.count(token) / 2000 - float(probs[token])) < 0.04


def test_temperature_scales_the_distribution() -> None:
    probs = filtered_probs(LOGITS, tensors(temperature=2.0))
    assert torch.allclose(probs[0], torch.softmax(LOGITS[0] / 2.0, dim=-1), atol=1e-6)


def test_draws_never_leave_the_kept_set() -> None:
    seen, counts = no_history()
    for seed in range(1, 300):
        params = {"temperature": 3.0, "top_k": 3, "top_p": 0.9, "min_p": 0.1, "seed": seed}
        token = int(sample(LOGITS, seen, counts, tensors(**params)))
        assert token in kept(**params)


def test_rows_of_a_batch_keep_their_own_parameters() -> None:
    params = [
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    batch = SamplingTensors.from_params(params, VOCAB, torch.device("cpu"))
    probs = filtered_probs(LOGITS.repeat(4, 1), batch)
    for row, p in enumerate(params):
        alone = filtered_probs(LOGITS, SamplingTensors.from_params([p], VOCAB, torch.device("cpu")))
        assert torch.allclose(probs[row], alone[0])


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.add(token)
        mass += float(probs[token])
    return kept


def test_top_p_over_a_large_vocabulary_peaked_and_flat() -> None:
    generator = torch.Generator().manual_seed(0)
    peaked = torch.randn((1, 5000), generator=generator) * 6
    flat = torch.randn((1, 5000), generator=generator) * 0.1  # 256 tokens hold far below 0.9
    for logits in (peaked, flat):
        params = SamplingTensors.from_params(
            [SamplingParams(temperature=1.0, top_p=0.9)], 5000, torch.device("cpu")
        )
        probs = filtered_probs(logits, params)[0]
        expected = reference_nucleus(torch.softmax(logits[0], dim=-1), 0.9)
        assert {int(i) for i in probs.nonzero()} == expected


def test_a_temperature_too_small_for_float32_is_greedy() -> None:
    seen, counts = no_history()
    assert SamplingParams(temperature=1e-40).greedy
    assert int(sample(LOGITS, seen, counts, tensors(temperature=1e-40, seed=3))) == 4


# A model whose defaults differ from the built-in ones, to tell the three sources apart.
SPEC = replace(
    resolve_model("tiny-random-mistral"), default_max_tokens=77, default_temperature=0.25
)


def test_resolve_takes_the_users_value_then_the_models_then_the_built_in_one() -> None:
    params = SamplingParams.resolve(SPEC, temperature=0.0, top_k=None, seed=None, stop="##")
    assert (params.temperature, params.max_tokens) == (0.0, 77)  # a 0 given is kept
    assert (params.top_k, params.top_p, params.repetition_penalty, params.seed) == (0, 1, 1, None)
    assert params.stop == ("##",)
    assert SamplingParams.resolve(SPEC, max_tokens=5, stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams.resolve(SPEC).temperature == 0.25


def test_both_dialects_resolve_the_same_fields_alike() -> None:
    given = {"max_tokens": 9, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "seed": 4, "stop": "x"}
    native = JobCreate.model_validate({"prompt": "hi", **given})
    chat = ChatCompletionBody.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **given}
    )
    assert native.to_sampling_params(SPEC) == chat.to_sampling_params(SPEC)
    assert native.to_sampling_params(SPEC) == SamplingParams(
        max_tokens=9, temperature=0.25, top_p=0.5, top_k=3, min_p=0.1, seed=4, stop=("x",)
    )


def test_each_dialect_keeps_its_own_rules() -> None:
    # Workers AI admits repetition_penalty 0, which means no penalty.
    native = JobCreate.model_validate({"prompt": "hi", "repetition_penalty": 0})
    assert native.to_sampling_params(SPEC).repetition_penalty == 1.0
    # OpenAI's max_completion_tokens wins over its older max_tokens.
    chat = ChatCompletionBody.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    assert chat.to_sampling_params(SPEC).max_tokens == 5
    both = chat.model_copy(update={"max_completion_tokens": 7})
    assert both.to_sampling_params(SPEC).max_tokens == 7


def test_every_sampling_parameter_is_a_column_or_named_as_none() -> None:
    batch = SamplingTensors.from_params(
        [SamplingParams(top_k=2, seed=1), SamplingParams(top_p=3.0)], VOCAB, torch.device("cpu")
    )
    host_side = {"params", "vocab_size", "flags"}
    columns = {f.name for f in fields(batch)} - {"greedy", "rng_key", "step"} - host_side
    not_columns = {
        "max_tokens",
        "seed",
        "stop",
        "logprobs",
        "top_logprobs",
        "response_format",
        "n",
    }
    assert columns == {f.name for f in fields(SamplingParams)} - not_columns
    assert batch.top_k.tolist() == [2, VOCAB] and batch.top_p.tolist() == [1.0, 1.0]
    assert batch.top_k.dtype == torch.int64 and batch.min_p.dtype == torch.float32
    for keep in ([1], torch.tensor([1])):
        kept_rows = batch.select(keep)
        assert kept_rows.top_k.tolist() == [VOCAB] and kept_rows.params == (batch.params[1],)
        assert kept_rows.rng_key.tolist() == batch.rng_key[1:].tolist()
