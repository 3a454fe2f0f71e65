"""Real LoRA adapters made with PEFT, and malformed ones, for upload tests."""

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save, save_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from jobs.registry import ModelSpec


def make_adapter(
    model_dir: Path,
    out: Path,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> Path:
    """A PEFT LoRA adapter for the model in `model_dir`, with non-zero weights."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return _save(base, out, rank, targets)


def make_adapter_for_shape(out: Path, hidden_size: int, rank: int = 4) -> Path:
    """An adapter for a Mistral of another width: well-formed, but it fits no served model."""
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
    )
    return _save(MistralForCausalLM(config), out, rank, ("q_proj",))


def make_adapter_for_model(out: Path, spec: ModelSpec, rank: int = 4) -> Path:
    """A one-layer q_proj adapter for a full-size registry model, written directly in PEFT's
    file format: building a 7B model to save it with PEFT would take gigabytes."""
    in_features, out_features = spec.architecture.projection_shapes()["q_proj"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(rank, in_features),
            f"{prefix}.lora_B.weight": torch.randn(out_features, rank),
        },
        str(out / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def greedy_alone(
    model_dir: Path, adapter: Path | None, ids: list[int], max_tokens: int
) -> list[int]:
    """Greedy output of one prompt, alone, through PEFT's own single-adapter model and Hugging
    Face `generate`: a reference that shares none of mbatch's decode or adapter code."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    tokens = [int(token) for token in out[0, len(ids) :]]
    return tokens[:-1] if tokens and tokens[-1] == 2 else tokens


def _save(base: Any, out: Path, rank: int, targets: tuple[str, ...]) -> Path:
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would change nothing
                param.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def files(adapter_dir: Path, **replace: bytes) -> dict[str, tuple[str, bytes]]:
    parts = {
        "adapter_config.json": (adapter_dir / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (adapter_dir / "adapter_model.safetensors").read_bytes(),
    }
    parts.update(replace)
    return {name: (name, data) for name, data in parts.items()}


def edited_config(adapter_dir: Path, **changes: Any) -> bytes:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config).encode()


def edited_weights(
    adapter_dir: Path,
    keep: Callable[[str], bool],
    rename: Callable[[str], str] = lambda key: key,
) -> bytes:
    """The adapter's safetensors with some tensors dropped or renamed."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    return save({rename(key): tensor.contiguous() for key, tensor in tensors.items() if keep(key)})


def pickled_weights(adapter_dir: Path) -> bytes:
    """The same weights as a pickled `.bin`, the format that must never be loaded."""
    return pickle.dumps({"weights": torch.zeros(2)})


def read_safetensors(adapter_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The header and the data section of the adapter's safetensors file, as written."""
    raw = (adapter_dir / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def safetensors_bytes(header: Any, data: bytes) -> bytes:
    """A safetensors file with exactly this header (a value, or its bytes as sent), however
    wrong: the library itself would never write most of the ones the tests make."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def large_adapter(spec: ModelSpec, layers: int, rank: int = 32) -> tuple[bytes, bytes]:
    """The config and weights of a zero-filled adapter on every module of the first `layers`
    layers of a full-size model: tens of megabytes, written without torch."""
    shapes = spec.architecture.projection_shapes()
    header: dict[str, Any] = {}
    offset = 0
    for layer in range(layers):
        for module, (in_features, out_features) in shapes.items():
            parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            for part, shape in (("A", [rank, in_features]), ("B", [out_features, rank])):
                size = shape[0] * shape[1] * 2
                header[f"{prefix}.lora_{part}.weight"] = {
                    "dtype": "F16",
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(shapes)}
    return json.dumps(config).encode(), safetensors_bytes(header, bytes(offset))
