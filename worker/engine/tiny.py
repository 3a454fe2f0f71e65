"""`mbatch make-tiny-model`: a real MistralForCausalLM with random weights and the v1 tokenizer."""

import json
import secrets
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from jobs.registry import resolve_model

_TINY = resolve_model("tiny-random-mistral")
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": _TINY.architecture.hidden_size,
    "intermediate_size": _TINY.architecture.intermediate_size,
    "num_hidden_layers": _TINY.architecture.num_layers,
    "num_attention_heads": _TINY.architecture.num_heads,
    "num_key_value_heads": _TINY.architecture.num_kv_heads,
    "head_dim": _TINY.architecture.head_dim,
    "max_position_embeddings": _TINY.context_length,
    "sliding_window": None,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
}


# What a finished build holds; a folder without all of them is not a model to load.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model")


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in MODEL_FILES)


def make_tiny_model(directory: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a Hugging Face model folder that `from_pretrained` loads; returns the folder.

    `config_overrides` change the shape (the benchmarks use a wider one). The folder appears
    whole or not at all (`build_atomically`)."""

    def build(staging: Path) -> None:
        random_tiny_model(seed, **config_overrides).save_pretrained(
            staging, safe_serialization=True
        )
        save_tokenizer(staging)

    return build_atomically(directory, build)


def build_atomically(
    directory: Path,
    build: Callable[[Path], None],
    complete: Callable[[Path], bool] = is_complete,
) -> Path:
    """Run `build` on an empty staging folder and move the result to `directory`.

    Callers take any folder with a `config.json` as a finished model, so a build that dies
    midway must not leave one behind. The staging folder sits beside the target, in the
    same parent so that the final rename is atomic, and a folder that `complete` accepts is
    kept as it is."""
    if complete(directory):
        return directory
    if directory.exists() and any(directory.iterdir()):
        # Never written by this function (its folders appear complete): not ours to delete.
        raise FileExistsError(f"{directory} exists and is not a complete model folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp, which would leave the finished folder readable by us alone.
    staging = directory.parent / f".{directory.name}.building-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        build(staging)
        try:
            # Replaces an empty folder; fails if another build finished first.
            staging.rename(directory)
        except OSError:
            if not complete(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def random_tiny_model(seed: int = 0, **config_overrides: Any) -> MistralForCausalLM:
    """The tiny Mistral with seeded random weights, in float32."""
    torch.manual_seed(seed)
    config = MistralConfig(**{**TINY_CONFIG, **config_overrides})
    model = MistralForCausalLM(config)
    # Default init gives near-uniform logits; wider weights make outputs depend on the
    # prompt and the sampling settings, which is what the tests look at.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


def save_tokenizer(directory: Path) -> None:
    """The v1 tokenizer as Hugging Face files (`tokenizer.json` with the real ids) plus the
    SentencePiece `tokenizer.model` that mbatch itself tokenizes with.

    A folder holding only `tokenizer.model` and `tokenizer_config.json` loads through
    `AutoTokenizer` as the Llama tokenizer it is; beside a model `config.json` it would not,
    so the tokenizer is loaded on its own first and saved next to the model.
    """
    data = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as staging, resources.as_file(data) as source:
        shutil.copyfile(source, Path(staging) / "tokenizer.model")
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        AutoTokenizer.from_pretrained(staging).save_pretrained(directory)
        shutil.copyfile(source, directory / "tokenizer.model")
