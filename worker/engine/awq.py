"""AWQ weights (4-bit, zero points, GEMM packing) written and read without an AWQ library.

`mbatch make-tiny-model --awq` writes the tiny Mistral in the layout of
`TheBloke/Mistral-7B-Instruct-v0.1-AWQ`, and beside it (in `dequantized/`) the same model with
every quantized weight replaced by its dequantized value: the reference the loading path is
checked against. Per linear layer of shape [out, in], with `group_size` input columns per group:

- `qweight` int32 [in, out / 8]: eight 4-bit codes per word, output columns interleaved as
  AutoAWQ's GEMM kernels read them (`AWQ_ORDER`);
- `qzeros` int32 [in / group_size, out / 8]: the zero points, packed the same way;
- `scales` float16 [in / group_size, out].

A weight is `(code - zero) * scale`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from worker.engine.tiny import build_atomically, is_complete, random_tiny_model, save_tokenizer

BITS = 4
MAX_CODE = (1 << BITS) - 1
CODES_PER_WORD = 32 // BITS
# Nibble i (bits 4i..4i+3) of word c holds output column 8c + AWQ_ORDER[i].
AWQ_ORDER: Sequence[int] = (0, 2, 4, 6, 1, 3, 5, 7)
# The real checkpoint's is 128; the tiny model's narrowest input (hidden_size 64) needs less,
# and 32 gives two groups per row there, so a group mix-up changes the weights.
TINY_GROUP_SIZE = 32
DEQUANTIZED = "dequantized"
# Scales keep this many significant bits, so that every (code - zero) * scale, at most
# 7 + 4 bits, is exact in float16 (11): the dequantized weights are the same whichever dtype
# a kernel dequantizes in, and the twin holds them exactly.
_SCALE_BITS = 7


@dataclass(frozen=True)
class AwqWeight:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.qweight.shape[0] // self.scales.shape[0]


def quantization_config(group_size: int) -> dict[str, Any]:
    """`quantization_config` of config.json: TheBloke's, plus the pure-PyTorch backend."""
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "backend": "torch_awq",
        "modules_to_not_convert": None,
    }


def quantize(weight: torch.Tensor, group_size: int) -> AwqWeight:
    """Round a [out, in] weight to 4-bit codes, per group of `group_size` input columns, with
    a zero point (AutoAWQ's min-max rounding, without its activation-aware search)."""
    out_features, in_features = weight.shape
    if in_features % group_size or out_features % CODES_PER_WORD:
        raise ValueError(f"a [{out_features}, {in_features}] weight does not fit {group_size=}")
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = _round_up_significand((high - low).clamp(min=1e-5) / MAX_CODE)
    zeros = torch.round(-low / scales).clamp(0, MAX_CODE)
    codes = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp(0, MAX_CODE)
    codes = codes.reshape(out_features, in_features).to(torch.int32)
    return AwqWeight(
        qweight=pack(codes.t()),
        qzeros=pack(zeros.to(torch.int32).t()),
        scales=scales.t().to(torch.float16).contiguous(),
    )


def _round_up_significand(values: torch.Tensor) -> torch.Tensor:
    # Up, not to nearest: a smaller scale would push a group's largest weight past code 15.
    significand, exponent = torch.frexp(values)
    significand = torch.ceil(significand * 2**_SCALE_BITS) / 2**_SCALE_BITS
    return torch.ldexp(significand, exponent.to(values.dtype))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes in 0..15 to [rows, cols / 8] int32 words, in AWQ's column order."""
    rows, cols = codes.shape
    by_word = codes.to(torch.int64).reshape(rows, cols // CODES_PER_WORD, CODES_PER_WORD)
    words = torch.zeros((rows, cols // CODES_PER_WORD), dtype=torch.int64)
    for nibble, column in enumerate(AWQ_ORDER):
        words |= by_word[..., column] << (BITS * nibble)
    # The top nibble reaches bit 31: store the word's bits as a signed int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: [rows, cols / 8] int32 to [rows, cols] int32 codes."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty((*words.shape, CODES_PER_WORD), dtype=torch.int64)
    for nibble, column in enumerate(AWQ_ORDER):
        codes[..., column] = (unsigned >> (BITS * nibble)) & MAX_CODE
    return codes.reshape(words.shape[0], -1).to(torch.int32)


def dequantize(weight: AwqWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(code - zero) * scale as the [out, in] weight of an `nn.Linear`."""
    group = weight.group_size
    codes = unpack(weight.qweight)
    zeros = unpack(weight.qzeros).repeat_interleave(group, dim=0)
    scales = weight.scales.to(dtype).repeat_interleave(group, dim=0)
    return ((codes - zeros).to(dtype) * scales).t().contiguous()


def is_complete_awq(directory: Path) -> bool:
    return is_complete(directory) and is_complete(directory / DEQUANTIZED)


def make_tiny_awq_model(
    directory: Path, seed: int = 0, group_size: int = TINY_GROUP_SIZE, **config_overrides: Any
) -> Path:
    """Write the tiny Mistral (or another shape, by `config_overrides`) as an AWQ checkpoint
    that `from_pretrained` loads, and its dequantized float16 twin in
    `directory / "dequantized"`; returns `directory`."""
    return build_atomically(
        directory,
        lambda staging: _build(staging, seed, group_size, config_overrides),
        is_complete_awq,
    )


@torch.no_grad()
def _build(directory: Path, seed: int, group_size: int, config_overrides: dict[str, Any]) -> None:
    model = random_tiny_model(seed, **config_overrides)
    quantized: dict[str, AwqWeight] = {}
    # The decoder's linear layers only: the real checkpoint keeps lm_head (and the
    # embeddings and norms) in float16, and transformers leaves lm_head unquantized.
    for name, module in model.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            awq = quantize(module.weight, group_size)
            module.weight.copy_(dequantize(awq))
            quantized[f"model.layers.{name}"] = awq
    model.half()
    twin = directory / DEQUANTIZED
    model.save_pretrained(twin, safe_serialization=True)
    save_tokenizer(twin)

    tensors = {
        key: value.contiguous()
        for key, value in model.state_dict().items()
        if key.removesuffix(".weight") not in quantized
    }
    for name, awq in quantized.items():
        tensors[f"{name}.qweight"] = awq.qweight
        tensors[f"{name}.qzeros"] = awq.qzeros
        tensors[f"{name}.scales"] = awq.scales
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.quantization_config = quantization_config(group_size)
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_tokenizer(directory)
