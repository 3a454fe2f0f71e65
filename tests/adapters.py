"""Real LoRA adapters made with PEFT, and malformed ones, for upload tests."""

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM


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


def pickled_weights(adapter_dir: Path) -> bytes:
    """The same weights as a pickled `.bin`, the format that must never be loaded."""
    return pickle.dumps({"weights": torch.zeros(2)})
