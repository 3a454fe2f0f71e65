"""Loading a registry model once per worker process, pinned for its life."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
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


def pick_dtype(setting: str, device: torch.device, quantization: str | None = None) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if quantization == "awq":
        # AWQ's scales are float16 and its kernels compute in float16 (transformers casts
        # bfloat16 to it on CUDA); the CPU multiplies float16 as well, so one dtype for both.
        return torch.float16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Left to itself ("auto"), gptqmodel picks an AWQ kernel for the CPU whatever the device, as
# transformers gives it no device map: a CPU-only int4pack kernel that computes in bfloat16,
# so other logits than the float16 model's. The pure-PyTorch kernel dequantizes to float16
# and multiplies, the same on every device, with nothing to compile.
AWQ_BACKEND = "torch_awq"


def awq_config(source: str) -> PretrainedConfig:
    """The checkpoint's config, its AWQ backend set to `AWQ_BACKEND` unless it names one
    (TheBloke's names none)."""
    config = AutoConfig.from_pretrained(source)
    quantization = dict(config.quantization_config)
    if quantization.get("backend") in (None, "auto", "autoawq"):
        quantization["backend"] = AWQ_BACKEND
    config.quantization_config = quantization
    return config


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
    dtype = pick_dtype(settings.dtype, device, spec.quantization)
    log.info(
        "loading %s from %s on %s (%s, %d CPU threads)",
        spec.name,
        source,
        device,
        dtype,
        torch.get_num_threads(),
    )
    extra = {"config": awq_config(source)} if spec.quantization == "awq" else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    tokenizer_file = Path(source) / "tokenizer.model"
    tokenizer = MistralTokenizer(tokenizer_file) if tokenizer_file.exists() else v1_tokenizer()
    # transformers may change the dtype asked for (AWQ: bfloat16 to float16 on CUDA).
    return LoadedModel(spec, model, tokenizer, device, model.dtype)
