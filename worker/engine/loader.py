"""Loading a registry model once per worker process, pinned for its life."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from jobs.registry import ModelSpec
from jobs.settings import Settings
from jobs.tokenizer import MistralTokenizer, v1_tokenizer
from worker.engine.tiny import is_complete, make_tiny_model

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: MistralTokenizer
    device: torch.device
    dtype: torch.dtype
    # The same model with LoRA layers injected, once an adapter has been loaded; from then
    # on every forward pass goes through it and names each row's adapter.
    peft: "PeftModel | None" = None


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def weights_source(spec: ModelSpec, settings: Settings, weights: Path | None) -> str:
    """`--weights`, else `$MBATCH_MODELS_DIR/<name>`, else the hub id; the tiny model is built."""
    if weights is not None:
        return str(weights)
    local = settings.models_dir / spec.name
    if spec.builtin and not is_complete(local):
        log.info("building %s in %s", spec.name, local)
        make_tiny_model(local)
    if local.exists():
        return str(local)
    return spec.weights


def load_model(spec: ModelSpec, settings: Settings, weights: Path | None = None) -> LoadedModel:
    hf_logging.disable_progress_bar()  # one model per process: its own log line is enough
    source = weights_source(spec, settings, weights)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    log.info(
        "loading %s from %s on %s (%s, %d CPU threads)",
        spec.name,
        source,
        device,
        dtype,
        torch.get_num_threads(),
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    tokenizer_file = Path(source) / "tokenizer.model"
    tokenizer = MistralTokenizer(tokenizer_file) if tokenizer_file.exists() else v1_tokenizer()
    return LoadedModel(spec, model, tokenizer, device, dtype)
