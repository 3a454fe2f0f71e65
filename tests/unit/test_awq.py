"""The AWQ model: the tiny checkpoint's layout, and loading it (transformers through gptqmodel)
against its dequantized float16 twin."""

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage
from mbatch.cli import build_parser
from worker.engine.awq import (
    DEQUANTIZED,
    TINY_GROUP_SIZE,
    AwqWeight,
    dequantize,
    is_complete_awq,
    make_tiny_awq_model,
    pack,
    unpack,
)
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel, load_model
from worker.engine.tiny import random_tiny_model

AWQ_MODEL = "mistral-7b-instruct-v0.1-awq"
needs_gptqmodel = pytest.mark.skipif(
    find_spec("gptqmodel") is None,
    reason="gptqmodel is not installed (the worker extra installs it): transformers loads "
    "AWQ checkpoints through it",
)


@pytest.fixture(scope="module")
def awq_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the tiny AWQ checkpoint under the registry's AWQ model."""
    root = tmp_path_factory.mktemp("awq-models")
    make_tiny_awq_model(root / AWQ_MODEL)
    return root


@pytest.fixture(scope="module")
def awq_dir(awq_models_dir: Path) -> Path:
    return awq_models_dir / AWQ_MODEL


@pytest.fixture(scope="module")
def awq(awq_models_dir: Path) -> LoadedModel:
    return load_model(resolve_model(AWQ_MODEL), Settings(models_dir=awq_models_dir))


@pytest.fixture(scope="module")
def twin(awq_dir: Path) -> LoadedModel:
    settings = Settings(models_dir=awq_dir, dtype="float16")
    return load_model(resolve_model("tiny-random-mistral"), settings, awq_dir / DEQUANTIZED)


def quantized_layers(tensors: dict[str, torch.Tensor]) -> dict[str, AwqWeight]:
    names = [key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")]
    return {
        name: AwqWeight(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]
        )
        for name in names
    }


def prompts(loaded: LoadedModel) -> list[list[int]]:
    texts = ["the cat sat on the mat", "seven dogs ran past old red barns", "grey skies"]
    return [loaded.tokenizer.encode_chat([ChatMessage("user", text)]) for text in texts]


def test_eight_codes_pack_into_a_word_in_awq_column_order() -> None:
    # Nibble i holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 (AutoAWQ's GEMM layout).
    word = pack(torch.arange(8, dtype=torch.int32)[None])
    assert word.dtype == torch.int32
    assert word.tolist() == [[0x75316420]]
    # Code 15 in the top nibble sets bit 31: the word is negative as an int32.
    codes = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    codes[0, 7] = 15
    words = pack(codes)
    assert words.shape == (5, 3) and words[0, 0] < 0
    assert torch.equal(unpack(words), codes.to(torch.int32))


def test_the_checkpoint_is_tiny_mistral_in_awq_layout(awq_dir: Path) -> None:
    assert is_complete_awq(awq_dir)
    config = json.loads((awq_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": TINY_GROUP_SIZE,
        "zero_point": True,
        "version": "gemm",
        "backend": "torch_awq",
        "modules_to_not_convert": None,
    }
    layers = quantized_layers(load_file(awq_dir / "model.safetensors"))
    assert len(layers) == 2 * 7  # every projection of both decoder layers; lm_head stays dense
    down = layers["model.layers.1.mlp.down_proj"]  # [out 64, in 128]
    assert down.qweight.shape == (128, 64 // 8) and down.qweight.dtype == torch.int32
    assert down.qzeros.shape == (128 // TINY_GROUP_SIZE, 64 // 8)
    assert down.scales.shape == (128 // TINY_GROUP_SIZE, 64) and down.scales.dtype == torch.float16


def test_the_unpacked_weights_are_the_twins_exactly(awq_dir: Path) -> None:
    tensors = load_file(awq_dir / "model.safetensors")
    twin = load_file(awq_dir / DEQUANTIZED / "model.safetensors")
    layers = quantized_layers(tensors)
    for name, weight in layers.items():
        dequantized = dequantize(weight)
        assert torch.equal(dequantized, twin[f"{name}.weight"]), name
        # No float16 rounding in (code - zero) * scale: a kernel that dequantizes in float32
        # gets the same weights.
        assert torch.equal(dequantize(weight, torch.float32), dequantized.float()), name
    dense = {key: value for key, value in tensors.items() if key.endswith(".weight")}
    assert dense.keys() == twin.keys() - {f"{name}.weight" for name in layers}
    for key, value in dense.items():
        assert torch.equal(value, twin[key]), key


def test_the_quantized_weights_are_the_random_ones_rounded(awq_dir: Path) -> None:
    original = random_tiny_model(seed=0).state_dict()
    for name, weight in quantized_layers(load_file(awq_dir / "model.safetensors")).items():
        error = (dequantize(weight, torch.float32) - original[f"{name}.weight"]).abs()
        # Within one step of the group's scale (half a step, but for the top code's clamp).
        step = weight.scales.float().repeat_interleave(TINY_GROUP_SIZE, dim=0).t()
        assert bool((error <= step).all()), name
        assert error.mean() < 0.3 * step.mean(), name


def test_make_tiny_model_awq_writes_both_folders(tmp_path: Path) -> None:
    args = build_parser().parse_args(["make-tiny-model", "--awq", str(tmp_path / "awq")])
    assert args.handler(args) == 0
    assert is_complete_awq(tmp_path / "awq")


@needs_gptqmodel
def test_the_awq_model_loads_in_float16_with_the_pure_pytorch_kernel(awq: LoadedModel) -> None:
    assert awq.dtype == torch.float16
    layer = awq.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "AwqTorchLinear"
    assert type(layer.mlp.down_proj).__name__ == "AwqTorchLinear"
    assert type(awq.model.lm_head) is nn.Linear


@needs_gptqmodel
def test_awq_logits_equal_the_dequantized_twins(awq: LoadedModel, twin: LoadedModel) -> None:
    ids = torch.tensor([prompt[:8] for prompt in prompts(awq)])
    with torch.inference_mode():
        logits = awq.model(ids).logits
        expected = twin.model(ids).logits
    assert logits.dtype == expected.dtype == torch.float16
    assert expected.abs().max() > 1  # the comparison means something
    # One float16 step at the logits' size; gptqmodel's own CPU kernel (bfloat16) is 0.16 off.
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


@needs_gptqmodel
def test_a_checkpoint_naming_no_backend_loads_with_the_pure_pytorch_kernel(
    awq_dir: Path, twin: LoadedModel, tmp_path: Path
) -> None:
    # TheBloke's config names no backend: gptqmodel would pick a CPU-only bfloat16 kernel.
    folder = tmp_path / AWQ_MODEL
    shutil.copytree(awq_dir, folder, ignore=shutil.ignore_patterns(DEQUANTIZED))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["backend"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(resolve_model(AWQ_MODEL), Settings(models_dir=tmp_path))
    assert type(loaded.model.model.layers[1].mlp.up_proj).__name__ == "AwqTorchLinear"
    ids = torch.tensor([prompts(loaded)[0]])
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.model(ids).logits, twin.model(ids).logits, rtol=1e-3, atol=1e-3
        )


@needs_gptqmodel
def test_greedy_decoding_gives_the_twins_tokens(awq: LoadedModel, twin: LoadedModel) -> None:
    batch = prompts(awq)
    params = [SamplingParams(max_tokens=6, temperature=0) for _ in batch]
    tokens = [row.token_ids for row in generate(awq, batch, params)]
    assert tokens == [row.token_ids for row in generate(twin, batch, params)]
    assert len({tuple(row) for row in tokens}) > 1  # the prompts lead somewhere different
