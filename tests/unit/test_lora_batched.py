"""Batched LoRA against PEFT's own single-adapter model, row by row, on the tiny model (fp32)."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, DynamicCache

from jobs.registry import resolve_model
from jobs.settings import Settings
from tests.adapters import make_adapter
from worker.engine.loader import LoadedModel, load_model
from worker.engine.lora_batched import (
    BASE,
    BatchedLoraLinear,
    adapter_slots,
    forward,
    forward_indexed,
    row_indices,
)
from worker.engine.lora_cache import AdapterLoadError, LoraCache, serving_config

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Different ranks and target modules; lora_mlp leaves every attention input projection alone.
ADAPTERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "lora_qv": (4, ("q_proj", "v_proj")),
    "lora_all": (8, ALL),
    "lora_mlp": (2, ("down_proj", "o_proj")),
}
PROMPT_LEN = 7
NEXT_TOKEN = 4242
# Logits here are up to about 12; the base model alone already differs by up to 1.5e-5 between
# a row in a batch and the row alone (float sums in another order), and an adapter's rows by
# up to about 5e-5. An adapter changes its rows' logits by far more (checked below).
ATOL, RTOL = 2e-4, 1e-5


@pytest.fixture(scope="module")
def adapter_dirs(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batched-adapters")
    return {
        name: make_adapter(
            models_dir / "tiny-random-mistral", root / name, rank=rank, targets=targets, seed=seed
        )
        for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items(), start=11)
    }


# A row's logits for its prompt, then for one cached decode step after it.
Reference = Callable[[str, list[int]], tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def reference(models_dir: Path, adapter_dirs: dict[str, Path]) -> Reference:
    """One row's logits, alone, through Hugging Face's model with PEFT's single-adapter model on
    top (or none, for `BASE`): code the batched path shares nothing with."""
    models: dict[str, torch.nn.Module] = {}

    def logits(name: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in models:
            base = AutoModelForCausalLM.from_pretrained(models_dir / "tiny-random-mistral")
            model = base if name == BASE else PeftModel.from_pretrained(base, adapter_dirs[name])
            models[name] = model.eval()
        with torch.no_grad():
            cache = DynamicCache()
            prompt = models[name](input_ids=torch.tensor([ids]), past_key_values=cache)
            step = models[name](input_ids=torch.tensor([[NEXT_TOKEN]]), past_key_values=cache)
        return prompt.logits[0], step.logits[0, 0]

    return logits


def fresh_model(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def load(cache: LoraCache, name: str, folder: Path, keep: set[str] | None = None) -> None:
    rank, targets = ADAPTERS[name]
    cache.ensure(
        name,
        serving_config(rank, 2 * rank, targets),
        lambda: (folder / "adapter_model.safetensors").read_bytes(),
        keep or set(),
    )


def prompts(rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows)
    return torch.randint(3, 32000, (rows, PROMPT_LEN), generator=generator)


def assert_rows_match(loaded: LoadedModel, names: list[str], reference: Reference) -> None:
    """A prefill and one cached decode step of the batch, through the batched forward: each
    row's logits are those of its adapter alone, at every position."""
    ids = prompts(len(names))
    with torch.inference_mode():
        cache = DynamicCache()
        prefill = forward(loaded, names, input_ids=ids, past_key_values=cache, use_cache=True)
        step_ids = torch.full((len(names), 1), NEXT_TOKEN)
        step = forward(loaded, names, input_ids=step_ids, past_key_values=cache, use_cache=True)
    for row, name in enumerate(names):
        expected_prompt, expected_step = reference(name, ids[row].tolist())
        torch.testing.assert_close(prefill.logits[row], expected_prompt, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(step.logits[row, 0], expected_step, atol=ATOL, rtol=RTOL)


def test_each_row_of_a_mixed_batch_gets_what_its_adapter_gives_alone(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=4)
    for name, folder in adapter_dirs.items():
        load(cache, name, folder)
    names = ["lora_qv", BASE, "lora_all", "lora_mlp", "lora_all", BASE, "lora_mlp", "lora_qv"]
    assert_rows_match(loaded, names, reference)

    # Each adapter does change its rows, and every adapter's rows differ from the others'.
    ids = prompts(1)[0].tolist()
    outputs = {name: reference(name, ids)[1] for name in [*ADAPTERS, BASE]}
    for name in ADAPTERS:
        others = [other for other in outputs if other != name]
        assert all((outputs[name] - outputs[o]).abs().max() > 0.1 for o in others)


def test_an_evicted_adapter_frees_its_slot_and_comes_back_into_one(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=2)
    load(cache, "lora_qv", adapter_dirs["lora_qv"])
    load(cache, "lora_all", adapter_dirs["lora_all"])
    slots = adapter_slots(loaded)
    assert slots is not None and slots.slot_of == {"lora_qv": 1, "lora_all": 2}

    load(cache, "lora_mlp", adapter_dirs["lora_mlp"])  # loads into slot 3, then evicts lora_qv
    assert slots.slot_of == {"lora_all": 2, "lora_mlp": 3}
    with pytest.raises(ValueError, match="lora_qv"):
        row_indices(loaded, ["lora_qv"])
    # Nothing of lora_qv is left in slot 1.
    assert all(1 not in layer.used for layer in slots.layers)
    assert all(not layer.lora_a[1].any() and not layer.lora_b[1].any() for layer in slots.layers)

    stacks = [(layer.lora_a, layer.lora_b) for layer in slots.layers]
    load(cache, "lora_qv", adapter_dirs["lora_qv"])  # back into slot 1, then evicts lora_all
    assert slots.slot_of == {"lora_mlp": 3, "lora_qv": 1} and cache.loads == 4
    # Written in place: the stacks are the tensors they were (a captured graph stays valid).
    assert all(
        layer.lora_a is a and layer.lora_b is b
        for layer, (a, b) in zip(slots.layers, stacks, strict=True)
    )
    for layer in slots.layers:  # lora_all's slot 2 is empty again
        assert 2 not in layer.used and not layer.lora_a[2].any() and not layer.lora_b[2].any()
    assert_rows_match(loaded, ["lora_mlp", BASE, "lora_qv", "lora_qv", "lora_mlp"], reference)


def test_a_batch_that_keeps_more_adapters_than_the_capacity_grows_the_stacks(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=1)
    load(cache, "lora_mlp", adapter_dirs["lora_mlp"])
    load(cache, "lora_all", adapter_dirs["lora_all"], keep={"lora_mlp"})
    load(cache, "lora_qv", adapter_dirs["lora_qv"], keep={"lora_mlp", "lora_all"})
    assert cache.resident == ["lora_mlp", "lora_all", "lora_qv"]
    assert_rows_match(loaded, ["lora_qv", "lora_mlp", BASE, "lora_all"], reference)


def test_only_the_targeted_layers_are_stacked(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=2)
    load(cache, "lora_mlp", adapter_dirs["lora_mlp"])
    stacked = {
        name.split(".")[-2]
        for name, module in loaded.model.named_modules()
        if isinstance(module, BatchedLoraLinear)
    }
    assert stacked == {"down_proj", "o_proj"}
    assert_rows_match(loaded, [BASE, "lora_mlp", BASE], reference)


def lora_ops(loaded: LoadedModel, indices: torch.Tensor | None, ids: torch.Tensor) -> int:
    """How many gathered LoRA passes (`baddbmm`, which nothing else in the model runs) a
    forward makes."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_indexed(loaded, indices, input_ids=ids)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::baddbmm")


def test_an_all_base_batch_runs_the_base_model_alone(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=3)
    for name, folder in adapter_dirs.items():
        load(cache, name, folder)
    slots = adapter_slots(loaded)
    assert slots is not None
    ids = prompts(3)
    assert lora_ops(loaded, None, ids) == 0
    assert lora_ops(loaded, row_indices(loaded, [BASE, "lora_qv", BASE]), ids) == len(slots.layers)
    # A plain call of the model, and the batched forward of base rows, are the base model:
    # PEFT's layers keep no active adapter.
    assert_rows_match(loaded, [BASE, BASE, BASE], reference)
    with torch.inference_mode():
        plain = loaded.model(input_ids=ids).logits
    for row in range(3):
        expected, _ = reference(BASE, ids[row].tolist())
        torch.testing.assert_close(plain[row], expected, atol=ATOL, rtol=RTOL)


def test_an_adapter_that_fails_to_load_takes_no_slot(
    models_dir: Path, adapter_dirs: dict[str, Path], reference: Reference
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=2)
    load(cache, "lora_qv", adapter_dirs["lora_qv"])
    with pytest.raises(AdapterLoadError):  # lora_all's weights under lora_qv's rank
        cache.ensure(
            "wrong_rank",
            serving_config(4, 8, ALL),
            lambda: (adapter_dirs["lora_all"] / "adapter_model.safetensors").read_bytes(),
        )
    slots = adapter_slots(loaded)
    assert slots is not None and slots.slot_of == {"lora_qv": 1}
    assert all(set(layer.used) <= {1} for layer in slots.layers)
    with pytest.raises(ValueError, match="wrong_rank"):
        forward(loaded, ["wrong_rank"], input_ids=prompts(1))
    assert_rows_match(loaded, ["lora_qv", BASE], reference)


def test_rows_name_no_adapter_when_none_is_loaded(models_dir: Path) -> None:
    loaded = fresh_model(models_dir)
    assert row_indices(loaded, [BASE, BASE]).tolist() == [0, 0]
    with pytest.raises(ValueError, match="none is loaded"):
        row_indices(loaded, [BASE, "lora_qv"])
