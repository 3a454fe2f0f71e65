"""Per-row sampling over a batch, vectorised: each row's parameters live in a tensor.

Greedy and random rows share one pass and are told apart with `torch.where`; every row draws
its one uniform number per step from its own generator, so a seeded row's tokens do not
depend on the other rows of its batch.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jobs.sampling import SamplingParams


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B], vocab size where the row keeps every token
    min_p: torch.Tensor  # [B]
    repetition_penalty: torch.Tensor  # [B]
    frequency_penalty: torch.Tensor  # [B]
    presence_penalty: torch.Tensor  # [B]
    greedy: torch.Tensor  # [B] bool
    generators: list[torch.Generator]

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> "SamplingTensors":
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        generators = []
        for p in params:
            generator = torch.Generator(device="cpu")
            if p.seed is not None:
                generator.manual_seed(p.seed)
            else:
                generator.seed()
            generators.append(generator)
        return cls(
            temperature=column([p.temperature for p in params]),
            top_p=column([min(p.top_p, 1.0) for p in params]),
            top_k=torch.tensor(
                [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                device=device,
            ),
            min_p=column([p.min_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
            frequency_penalty=column([p.frequency_penalty for p in params]),
            presence_penalty=column([p.presence_penalty for p in params]),
            greedy=torch.tensor([p.greedy for p in params], device=device),
            generators=generators,
        )


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face), then frequency and presence
    penalties over the output alone (OpenAI)."""
    penalty = tensors.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen, penalized, logits)
    counts = generated_counts.to(logits.dtype)
    logits = logits - tensors.frequency_penalty.unsqueeze(1) * counts
    logits = logits - tensors.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(
    logits: torch.Tensor, tensors: SamplingTensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top_k, top_p and min_p, in descending order of logit,
    with the token ids of that order."""
    temperature = torch.where(
        tensors.greedy, torch.ones_like(tensors.temperature), tensors.temperature
    )
    scaled = logits / temperature.unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    keep = ranks < tensors.top_k.unsqueeze(1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # top_p: keep the smallest prefix whose mass reaches top_p (always the first token).
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= mass_before < tensors.top_p.unsqueeze(1)
    keep &= probs >= tensors.min_p.unsqueeze(1) * probs[:, :1]
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True), sorted_ids


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """One token per row: the argmax for greedy rows, a draw for the others."""
    logits = apply_penalties(logits.float(), seen, generated_counts, tensors)
    greedy_tokens = logits.argmax(dim=-1)
    if bool(tensors.greedy.all()):  # nothing to draw: skip the sort over the vocabulary
        return greedy_tokens
    probs, sorted_ids = filtered_probs(logits, tensors)
    uniforms = torch.stack([torch.rand((), generator=g) for g in tensors.generators])
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1))
    index = index.clamp(max=probs.shape[-1] - 1)
    sampled = sorted_ids.gather(1, index).squeeze(1)
    return torch.where(tensors.greedy, greedy_tokens, sampled)
