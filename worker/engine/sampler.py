"""Per-row sampling over a batch, vectorised and free of host waits.

Each row's parameters live in a [B] tensor column; which filters a batch needs at all is
decided by Python flags computed from the rows' `SamplingParams` when rows join or leave, so
`sample` branches only on those and never reads a tensor back. Every row draws its uniform
number on the device from a counter-based hash of its own seed and its own step count
(splitmix64), so a seeded row's tokens depend only on its seed, its step and its logits: the
same alone, in any batch, in any slot, whoever joins or leaves around it.

How a decode loop uses it:
- `SamplingTensors.from_params(params, vocab_size, device)` builds the rows (None: an idle
  slot, which samples greedily and sets no flag);
- `sample(logits, seen, generated_counts, tensors)` picks one token per row and advances
  every row's step counter;
- a loop whose batch shrinks calls `select(rows)` with the host list of the rows it keeps;
- a loop with fixed slots calls `assign(slots, params)` to refill slots (or empty them with
  None) in place; a loop that appends joining rows calls `concat(other)`.
"""

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from jobs.sampling import SamplingParams

# Every SamplingParams field is a per-row column of SamplingTensors, a float32 one holding the
# field's own value, except for these few. Not columns: max_tokens (the decode loop's), seed
# (it becomes the row's `rng_key`), stop (checked on the decoded text), logprobs and
# top_logprobs (reported by the decode loop, from the raw logits: they never change a draw),
# response_format (the decode loop masks the logits before they reach the sampler) and n (the
# decode loop makes a row per sample, each with a seed of its own).
_NOT_COLUMNS = frozenset(
    {"max_tokens", "seed", "stop", "logprobs", "top_logprobs", "response_format", "n"}
)
# Columns that hold something other than the field's own value.
_COLUMN_RULES: dict[str, Callable[[SamplingParams, int], float]] = {
    "top_p": lambda p, vocab_size: min(p.top_p, 1.0),  # 1 or more keeps every token
    "top_k": lambda p, vocab_size: p.top_k if 0 < p.top_k < vocab_size else vocab_size,
}
_INTEGER_COLUMNS = frozenset({"top_k"})
# What an idle slot samples with: greedy, no filter, no penalty, so it sets no flag.
IDLE = SamplingParams(temperature=0.0)

_MASK64 = (1 << 64) - 1
# splitmix64's constants, as the signed int64 values torch holds them in.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
# A uniform takes the hash's top 24 bits: every value is exact in float32 and below 1.
_UNIFORM_BITS = 24


@dataclass(frozen=True)
class SamplingFlags:
    """What a batch needs done at all, known on the host: `sample` branches on these alone.

    A flag set for a batch whose rows do not need the step is harmless (each row's own column
    makes the step an identity for it); only skipping a needed step would be wrong."""

    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_repetition_penalty: bool
    any_additive_penalty: bool
    top_k_max: int  # the largest top_k that cuts anything, 0 where none does

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab_size: int) -> "SamplingFlags":
        sampled = [p for p in params if not p.greedy]
        limits = [p.top_k for p in sampled if 0 < p.top_k < vocab_size]
        return cls(
            all_greedy=not sampled,
            any_top_k=bool(limits),
            any_top_p=any(p.top_p < 1 for p in sampled),
            any_min_p=any(p.min_p > 0 for p in sampled),
            any_repetition_penalty=any(p.repetition_penalty != 1 for p in params),
            any_additive_penalty=any(
                p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params
            ),
            top_k_max=max(limits, default=0),
        )


@dataclass(eq=False)  # tensors have no truth value to compare by
class SamplingTensors:
    """One column per sampling parameter (a [B] tensor, row i for params[i]), `greedy`, each
    row's random key and step count on the device, and the rows' params and flags on the host.
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # vocab size where the row keeps every token
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    greedy: torch.Tensor  # bool
    rng_key: torch.Tensor  # int64: splitmix64 of the row's seed (a random one where unseeded)
    step: torch.Tensor  # int64: draws the row has made; `sample` advances it
    params: tuple[SamplingParams | None, ...]  # None: an idle slot
    vocab_size: int
    flags: SamplingFlags = field(init=False)

    def __post_init__(self) -> None:
        self.flags = SamplingFlags.of(_live(self.params), self.vocab_size)

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams | None], vocab_size: int, device: torch.device
    ) -> "SamplingTensors":
        """The rows for these params, each at step 0; None leaves an idle slot."""
        return cls(
            **_columns(params, vocab_size, device),
            params=tuple(params),
            vocab_size=vocab_size,
        )

    def select(self, keep: Sequence[int] | torch.Tensor) -> "SamplingTensors":
        """The rows still decoding, in the order given, each keeping its step count.

        Pass the kept row numbers as a host list (the loop knows them: it decided on the host
        which rows finished); a tensor is read back, which is free on the CPU but waits for the
        device elsewhere."""
        rows = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        index = _to_device(rows, torch.int64, self.rng_key.device)
        return SamplingTensors(
            **{name: getattr(self, name)[index] for name in _tensor_names()},
            params=tuple(self.params[row] for row in rows),
            vocab_size=self.vocab_size,
        )

    def concat(self, other: "SamplingTensors") -> "SamplingTensors":
        """These rows, then `other`'s, each keeping its step count: rows joining a batch."""
        return SamplingTensors(
            **{
                name: torch.cat([getattr(self, name), getattr(other, name)])
                for name in _tensor_names()
            },
            params=self.params + other.params,
            vocab_size=self.vocab_size,
        )

    def assign(self, slots: Sequence[int], params: Sequence[SamplingParams | None]) -> None:
        """Refill these slots in place with new rows at step 0 (None: empty the slot), so a
        loop with fixed slots keeps the same tensors from step to step."""
        if len(slots) != len(params):
            raise ValueError(f"{len(slots)} slots for {len(params)} params")
        if not slots:
            return
        device = self.rng_key.device
        index = _to_device(list(slots), torch.int64, device)
        for name, column in _columns(params, self.vocab_size, device).items():
            getattr(self, name).index_copy_(0, index, column)
        rows = list(self.params)
        for slot, row in zip(slots, params, strict=True):
            rows[slot] = row
        self.params = tuple(rows)
        self.flags = SamplingFlags.of(_live(self.params), self.vocab_size)

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.flags.any_repetition_penalty

    @property
    def uses_additive_penalties(self) -> bool:
        return self.flags.any_additive_penalty


def _live(params: Sequence[SamplingParams | None]) -> list[SamplingParams]:
    return [IDLE if p is None else p for p in params]


def _tensor_names() -> list[str]:
    return [
        f.name for f in fields(SamplingTensors) if f.name not in {"params", "vocab_size", "flags"}
    ]


def _columns(
    params: Sequence[SamplingParams | None], vocab_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    live = _live(params)
    columns = {}
    for name in (f.name for f in fields(SamplingParams) if f.name not in _NOT_COLUMNS):
        rule = _COLUMN_RULES.get(name)
        values = [rule(p, vocab_size) if rule else getattr(p, name) for p in live]
        dtype = torch.int64 if name in _INTEGER_COLUMNS else torch.float32
        columns[name] = _to_device(values, dtype, device)
    columns["greedy"] = _to_device([p.greedy for p in live], torch.bool, device)
    columns["rng_key"] = _to_device([rng_key(p.seed) for p in live], torch.int64, device)
    columns["step"] = torch.zeros(len(live), dtype=torch.int64, device=device)
    return columns


def _to_device(
    values: list[int] | list[float] | list[bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # Non-blocking: from pageable memory the copy is staged at once, without waiting for the
    # device to finish the work already queued (a blocking copy would wait).
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def rng_key(seed: int | None) -> int:
    """A row's random key, as a signed int64: splitmix64 of its seed reduced modulo 2**64, or
    of a random seed drawn now where it has none. Any int is a seed, however big or negative."""
    value = secrets.randbits(64) if seed is None else seed & _MASK64
    return _signed(_mix_int(value))


def _mix_int(z: int) -> int:
    """splitmix64's finaliser over Python ints (exact 64-bit unsigned arithmetic)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _signed(z: int) -> int:
    return z - (1 << 64) if z >= 1 << 63 else z


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch shifts int64 arithmetically (copying the sign bit); splitmix64 shifts logically.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser over int64 tensors: torch's int64 products wrap modulo 2**64,
    which is the unsigned arithmetic the hash is defined with."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniforms(rng_key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row: the splitmix64 output of the row's key at its step."""
    hashed = _mix(rng_key + (step + 1) * _GOLDEN)
    return _shift_right(hashed, 64 - _UNIFORM_BITS).to(torch.float32) * 2.0**-_UNIFORM_BITS


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face), then frequency and presence
    penalties over the output alone (OpenAI)."""
    if tensors.flags.any_repetition_penalty:
        penalty = tensors.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if tensors.flags.any_additive_penalty:
        counts = generated_counts.to(logits.dtype)
        logits = logits - tensors.frequency_penalty.unsqueeze(1) * counts
        logits = logits - tensors.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Each row's distribution after temperature, top_k, top_p and min_p, in that order (zeros
    where cut), in vocabulary order."""
    flags = tensors.flags
    ones = torch.ones_like(tensors.temperature)
    temperature = torch.where(tensors.greedy, ones, tensors.temperature)
    scaled = logits / temperature.unsqueeze(1)
    if flags.any_top_k:
        vocab = logits.shape[-1]
        k_max = min(flags.top_k_max, vocab)
        top_values = scaled.topk(k_max, dim=-1).values
        kth = top_values.gather(1, (tensors.top_k.clamp(max=k_max) - 1).unsqueeze(1))
        limited = (tensors.top_k < vocab).unsqueeze(1)
        scaled = torch.where(limited & (scaled < kth), float("-inf"), scaled)
    probs = torch.softmax(scaled, dim=-1)
    if flags.any_top_p:
        probs = _nucleus(probs, tensors.top_p)
    if flags.any_min_p:
        # min_p last, as vLLM orders them; the best token always stays, so its bar is unchanged.
        min_p = tensors.min_p.unsqueeze(1)
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    return probs / probs.sum(dim=-1, keepdim=True)


# The nucleus threshold is found a digit of the probabilities' bits at a time, from the top:
# (shift, width) of each digit. Three passes over the vocabulary; wider digits would mean
# fewer passes but larger histograms.
_DIGITS = ((22, 10), (11, 11), (0, 11))


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p: keep the smallest prefix, by probability, whose mass reaches top_p (the best
    token always; every token tied with the last one kept), in every row whose top_p is
    below 1.

    Without sorting the vocabulary: the last kept probability is the largest value t whose
    tokens at or above t hold top_p of the mass. Non-negative float32 values order as their
    bits do as int32, so t is found as a radix select, a digit at a time from the top: a
    histogram of the mass by the next digit, among the tokens that match the digits found so
    far, tells that digit. A few passes over the vocabulary and no host sync; exact but for
    the rounding of the masses at the boundary, as a sorted cumsum rounds too. (On CUDA,
    scatter_add_ adds in no fixed order, so a row exactly at that boundary may round either
    way; `torch.use_deterministic_algorithms` fixes the order.)
    """
    bits = probs.view(torch.int32)  # a probability is at most 1: far from int32's limits
    # Above 0, so that no digit above the best token's qualifies: top_p 0 keeps the best.
    target = (top_p * probs.sum(dim=-1)).clamp(min=torch.finfo(probs.dtype).tiny).unsqueeze(1)
    found = torch.zeros_like(bits[:, :1])  # the threshold's digits so far
    for shift, width in _DIGITS:
        # One histogram bin per digit, with a bin below them for the tokens under the digits
        # found so far and one above for those over them: (bits - found) >> shift is the
        # digit where the higher digits match, negative below and too large above. The
        # outer bins replace a masked copy of the probabilities; the one above holds the mass
        # already kept.
        bins = (bits - (found - (1 << shift))) >> shift
        bins = bins.clamp_(0, (1 << width) + 1).long()  # scatter_add_ wants int64
        mass = torch.zeros(
            (probs.shape[0], (1 << width) + 2), dtype=probs.dtype, device=probs.device
        )
        mass.scatter_add_(1, bins, probs)
        # at_least[d]: the mass at or above a threshold with this digit d. The mass above is
        # added last: a running sum that started from it would round every small digit's mass
        # at its scale.
        digits = mass[:, 1:-1]
        at_least = mass[:, -1:] + digits.flip(-1).cumsum(-1).flip(-1)
        # The largest digit whose mass still reaches the target (at least digit 0).
        chosen = ((at_least >= target).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
        found = found | (chosen.to(torch.int32) << shift)
    cut = (bits < found) & (top_p < 1).unsqueeze(1)
    return probs.masked_fill(cut, 0)


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    generated_counts: torch.Tensor,
    tensors: SamplingTensors,
) -> torch.Tensor:
    """One token per row: the argmax for greedy rows, a draw for the others. Advances every
    row's step count; reads nothing back to the host."""
    logits = apply_penalties(logits.float(), seen, generated_counts, tensors)
    greedy_tokens = logits.argmax(dim=-1)
    if tensors.flags.all_greedy:  # nothing to draw: skip the work over the vocabulary
        tensors.step.add_(1)
        return greedy_tokens
    drawn = uniforms(tensors.rng_key, tensors.step)
    tensors.step.add_(1)
    probs = filtered_probs(logits, tensors)
    cdf = probs.cumsum(dim=-1)
    target = drawn.unsqueeze(1) * cdf[:, -1:]
    # The first token whose cdf passes the target: as the uniform is below 1, one whose
    # probability is above 0.
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Never land on a token the filters cut, even where rounding leaves the cdf flat: the
    # best token instead, which no filter cuts (it is the greedy one, already at hand).
    sampled = sampled.clamp(max=probs.shape[-1] - 1)
    sampled = torch.where(
        probs.gather(1, sampled.unsqueeze(1)).squeeze(1) > 0, sampled, greedy_tokens
    )
    return torch.where(tensors.greedy, greedy_tokens, sampled)
