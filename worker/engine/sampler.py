"""Per-row sampling over a batch, vectorised: each row's parameters live in a tensor.

Greedy and random rows share one pass and are told apart with `torch.where`; every row draws
its one uniform number per step from its own generator, so a seeded row's tokens do not
depend on the other rows of its batch. The vocabulary is sorted only for the rows that ask
for top_p: top_k takes a threshold from `topk`, min_p one from the row's best token.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from jobs.sampling import SamplingParams

# Every SamplingParams field is a per-row column of SamplingTensors, a float32 one holding the
# field's own value, except for these few. Not columns: max_tokens (the decode loop's), seed
# (it seeds the row's generator) and stop (checked on the decoded text).
_NOT_COLUMNS = frozenset({"max_tokens", "seed", "stop"})
# Columns that hold something other than the field's own value.
_COLUMN_RULES: dict[str, Callable[[SamplingParams, int], float]] = {
    "top_p": lambda p, vocab_size: min(p.top_p, 1.0),  # 1 or more keeps every token
    "top_k": lambda p, vocab_size: p.top_k if 0 < p.top_k < vocab_size else vocab_size,
}
_INTEGER_COLUMNS = frozenset({"top_k"})


@dataclass
class SamplingTensors:
    """One column per sampling parameter (a [B] tensor, row i for params[i]), `greedy`, and
    the rows' generators."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # vocab size where the row keeps every token
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    greedy: torch.Tensor  # bool
    generators: list[torch.Generator]

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> "SamplingTensors":
        columns = {}
        for name in (f.name for f in fields(SamplingParams) if f.name not in _NOT_COLUMNS):
            rule = _COLUMN_RULES.get(name)
            values = [rule(p, vocab_size) if rule else getattr(p, name) for p in params]
            dtype = torch.int64 if name in _INTEGER_COLUMNS else torch.float32
            columns[name] = torch.tensor(values, dtype=dtype, device=device)
        return cls(
            **columns,
            greedy=torch.tensor([p.greedy for p in params], device=device),
            generators=[_generator(p.seed) for p in params],
        )

    def select(self, keep: torch.Tensor) -> "SamplingTensors":
        """The rows still decoding, in the same order."""
        rows = keep.tolist()
        columns = {
            f.name: getattr(self, f.name)[keep] for f in fields(self) if f.name != "generators"
        }
        return SamplingTensors(**columns, generators=[self.generators[row] for row in rows])

    @property
    def uses_repetition_penalty(self) -> bool:
        return bool((self.repetition_penalty != 1).any())

    @property
    def uses_additive_penalties(self) -> bool:
        return bool((self.frequency_penalty != 0).any() or (self.presence_penalty != 0).any())


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face), then frequency and presence
    penalties over the output alone (OpenAI)."""
    if tensors.uses_repetition_penalty:
        penalty = tensors.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if tensors.uses_additive_penalties:
        counts = generated_counts.to(logits.dtype)
        logits = logits - tensors.frequency_penalty.unsqueeze(1) * counts
        logits = logits - tensors.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Each row's distribution after temperature, top_k, top_p and min_p, in that order (zeros
    where cut), in vocabulary order."""
    ones = torch.ones_like(tensors.temperature)
    temperature = torch.where(tensors.greedy, ones, tensors.temperature)
    scaled = logits / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    if bool((tensors.top_k < vocab).any()):
        k_max = int(tensors.top_k[tensors.top_k < vocab].max())
        top_values = scaled.topk(k_max, dim=-1).values
        kth = top_values.gather(1, (tensors.top_k.clamp(max=k_max) - 1).unsqueeze(1))
        limited = (tensors.top_k < vocab).unsqueeze(1)
        scaled = torch.where(limited & (scaled < kth), float("-inf"), scaled)
    probs = torch.softmax(scaled, dim=-1)
    nucleus_rows = (tensors.top_p < 1).nonzero().squeeze(1)
    if nucleus_rows.numel():
        kept = _nucleus(probs[nucleus_rows], tensors.top_p[nucleus_rows].unsqueeze(1))
        probs = probs.index_copy(0, nucleus_rows, kept)
    # min_p last, as vLLM orders them; the best token always stays, so its bar is unchanged.
    min_p = tensors.min_p.unsqueeze(1)
    probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    return probs / probs.sum(dim=-1, keepdim=True)


NUCLEUS_CANDIDATES = 256


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p: keep the smallest prefix, by probability, whose mass reaches top_p.

    The prefix is looked for among each row's most likely tokens first, which is exact when
    they already hold top_p of the mass (the usual case) and far cheaper than sorting the
    vocabulary; the rows where they do not are sorted whole.
    """
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    values, ids = probs.topk(k, dim=-1)
    total = probs.sum(dim=-1, keepdim=True)
    short = (values.sum(dim=-1, keepdim=True) < top_p * total).squeeze(1)
    if bool(short.any()):
        values, ids = probs.sort(dim=-1, descending=True)
    mass_before = values.cumsum(dim=-1) - values
    cut = mass_before >= top_p * total
    cut[:, 0] = False
    return torch.zeros_like(probs).scatter(1, ids, torch.where(cut, 0.0, values))


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """One token per row: the argmax for greedy rows, a draw for the others."""
    logits = apply_penalties(logits.float(), seen, generated_counts, tensors)
    greedy_tokens = logits.argmax(dim=-1)
    if bool(tensors.greedy.all()):  # nothing to draw: skip the work over the vocabulary
        return greedy_tokens
    probs = filtered_probs(logits, tensors)
    uniforms = torch.stack([torch.rand((), generator=g) for g in tensors.generators])
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Never land on a token the filters cut, even where rounding leaves the cdf flat.
    sampled = sampled.clamp(max=probs.shape[-1] - 1)
    sampled = torch.where(
        probs.gather(1, sampled.unsqueeze(1)).squeeze(1) > 0, sampled, probs.argmax(dim=-1)
    )
    return torch.where(tensors.greedy, greedy_tokens, sampled)


def _generator(seed: int | None) -> torch.Generator:
    """A row's own generator: seeded where the row asks, from fresh entropy otherwise."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator
