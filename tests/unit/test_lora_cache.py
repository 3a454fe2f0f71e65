"""Mixed-adapter batches and the adapter cache, on the tiny model with real PEFT adapters."""

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage
from tests.adapters import greedy_alone, make_adapter
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel, load_model
from worker.engine.lora_cache import AdapterLoadError, LoraCache, serving_config

ADAPTERS = {
    "lora_qv": {"rank": 4, "targets": ("q_proj", "v_proj"), "seed": 1},
    "lora_all": {
        "rank": 8,
        "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "seed": 2,
    },
    "lora_mlp": {"rank": 2, "targets": ("down_proj", "o_proj"), "seed": 3},
}
PROMPTS = ["Write a haiku about rain.", "List three prime numbers.", "Say hello in French."]


@pytest.fixture(scope="module")
def adapter_dirs(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(
            models_dir / "tiny-random-mistral",
            root / name,
            rank=int(spec["rank"]),  # type: ignore[call-overload]
            targets=spec["targets"],  # type: ignore[arg-type]
            seed=int(spec["seed"]),  # type: ignore[call-overload]
        )
        for name, spec in ADAPTERS.items()
    }


def fresh_model(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def config_of(name: str) -> LoraConfig:
    spec = ADAPTERS.get(name, ADAPTERS["lora_all"])
    rank = int(spec["rank"])  # type: ignore[call-overload]
    return serving_config(rank, 2 * rank, spec["targets"])  # type: ignore[arg-type]


def copy_from(folder: Path) -> Callable[[], bytes]:
    return lambda: (folder / "adapter_model.safetensors").read_bytes()


def prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode_chat([ChatMessage("user", text)])


def test_a_mixed_batch_gives_each_row_what_its_adapter_gives_alone(
    models_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=4)
    for name, folder in adapter_dirs.items():
        cache.ensure(name, config_of(name), copy_from(folder))

    # Every prompt under every adapter and under none, shuffled into one batch of 12.
    rows = [(text, adapter) for text in PROMPTS for adapter in [*ADAPTERS, None]]
    random.Random(5).shuffle(rows)
    params = [SamplingParams(max_tokens=12, temperature=0) for _ in rows]
    out = generate(
        loaded,
        [prompt_ids(loaded, text) for text, _ in rows],
        params,
        [adapter for _, adapter in rows],
    )

    by_row = {row: generation.token_ids for row, generation in zip(rows, out, strict=True)}
    for (text, adapter), tokens in by_row.items():
        adapter_dir = adapter_dirs[adapter] if adapter is not None else None
        expected = greedy_alone(
            models_dir / "tiny-random-mistral", adapter_dir, prompt_ids(loaded, text), 12
        )
        assert tokens == expected, (text, adapter)
        if adapter is not None:
            assert tokens != by_row[(text, None)], f"{adapter} changed nothing on {text!r}"


def test_an_evicted_adapter_is_loaded_again_and_gives_the_same_output(
    models_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=2)
    ids = [prompt_ids(loaded, PROMPTS[0])]
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=7)]

    cache.ensure("lora_qv", config_of("lora_qv"), copy_from(adapter_dirs["lora_qv"]))
    first = generate(loaded, ids, params, ["lora_qv"])[0].token_ids
    cache.ensure("lora_all", config_of("lora_all"), copy_from(adapter_dirs["lora_all"]))
    cache.ensure("lora_mlp", config_of("lora_mlp"), copy_from(adapter_dirs["lora_mlp"]))
    assert cache.resident == ["lora_all", "lora_mlp"] and cache.loads == 3
    assert loaded.peft is not None and "lora_qv" not in loaded.peft.peft_config

    cache.ensure("lora_qv", config_of("lora_qv"), copy_from(adapter_dirs["lora_qv"]))
    assert cache.resident == ["lora_mlp", "lora_qv"] and cache.loads == 4
    assert generate(loaded, ids, params, ["lora_qv"])[0].token_ids == first


def test_a_cache_hit_loads_nothing_and_the_batch_keeps_its_adapters(
    models_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    loaded = fresh_model(models_dir)
    cache = LoraCache(loaded, capacity=1)
    cache.ensure("lora_qv", config_of("lora_qv"), copy_from(adapter_dirs["lora_qv"]))
    cache.ensure(
        "lora_qv", config_of("lora_qv"), copy_from(Path("/nonexistent"))
    )  # a hit never fetches
    assert cache.loads == 1
    # A batch that needs both keeps both, even past capacity, until the next load.
    cache.ensure(
        "lora_all", config_of("lora_all"), copy_from(adapter_dirs["lora_all"]), keep={"lora_qv"}
    )
    assert cache.resident == ["lora_qv", "lora_all"]


def base_output(loaded: LoadedModel) -> list[int]:
    ids = [prompt_ids(loaded, PROMPTS[1])]
    return generate(loaded, ids, [SamplingParams(max_tokens=10, temperature=0)])[0].token_ids


def broken_copies(adapter: Path, root: Path) -> dict[str, Path]:
    """Adapters that cannot load: not safetensors, and weights PEFT would silently skip."""
    weights = load_file(adapter / "adapter_model.safetensors")
    made = {}
    for name, tensors in {
        "renamed": {key.replace("layers", "layerz"): t for key, t in weights.items()},
        "a_without_b": {key: t for key, t in weights.items() if "lora_A" in key},
    }.items():
        (root / name).mkdir()
        save_file(tensors, str(root / name / "adapter_model.safetensors"))
        made[name] = root / name
    (root / "garbage").mkdir()
    (root / "garbage" / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    made["garbage"] = root / "garbage"
    return made


def test_an_adapter_that_fails_to_load_changes_no_row_and_leaves_the_cache_as_it_was(
    models_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    loaded = fresh_model(models_dir)
    base = base_output(loaded)
    cache = LoraCache(loaded, capacity=2)
    broken = broken_copies(adapter_dirs["lora_all"], tmp_path)
    # Failing as the very first adapter, and again with another one loaded.
    for name, folder in broken.items():
        with pytest.raises(AdapterLoadError):
            cache.ensure(name, config_of("lora_all"), copy_from(folder))
        assert base_output(loaded) == base, name
    # A shape that does not fit the config fails in PEFT itself, after its layers exist.
    with pytest.raises(AdapterLoadError):
        cache.ensure("wrong_rank", config_of("lora_qv"), copy_from(adapter_dirs["lora_all"]))
    assert base_output(loaded) == base and cache.resident == [] and cache.loads == 0

    cache.ensure("lora_qv", config_of("lora_qv"), copy_from(adapter_dirs["lora_qv"]))
    assert loaded.peft is not None and set(loaded.peft.peft_config) == {"lora_qv"}
    assert base_output(loaded) == base
