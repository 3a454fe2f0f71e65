"""The decode loop: one prefill over left-padded prompts, then one token per row per step.

Rows that finish leave the batch at once: their rows of the KV cache are dropped, and so are
cache columns that only padding still occupies, so no compute goes to finished work.
"""

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from jobs.sampling import SamplingParams
from worker.engine.loader import LoadedModel
from worker.engine.lora_cache import BASE, adapter_names
from worker.engine.sampler import SamplingTensors, sample

Decode = Callable[[Sequence[int]], str]
# The rows (by index) whose results are no longer wanted: they leave at the next step.
Dropped = Callable[[], Collection[int]]
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", or CANCELLED
    compute_seconds: float  # this row's share of the batch's time, by tokens


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    positions = [text.find(stop) for stop in stops]
    found = [pos for pos in positions if pos >= 0]
    return text[: min(found)] if found else None


class _Row:
    """The state of one prompt while it decodes."""

    def __init__(self, prompt: list[int], params: SamplingParams, budget: int) -> None:
        self.prompt = prompt
        self.params = params
        self.budget = budget
        self.tokens: list[int] = []
        self.finish: str | None = "length" if budget == 0 else None
        self.cut_text: str | None = None
        self.seconds = 0.0

    def accept(self, token: int, eos_id: int, decode: Decode) -> None:
        if token == eos_id:
            self.finish = "stop"
            return
        self.tokens.append(token)
        if self.params.stop and self._stop_in_tail(decode):
            cut = _cut_at_stop(decode(self.tokens), self.params.stop)
            if cut is not None:
                self.cut_text, self.finish = cut, "stop"
                return
        if len(self.tokens) >= self.budget:
            self.finish = "length"

    def _stop_in_tail(self, decode: Decode) -> bool:
        """Whether a stop string ends in the newest tokens: every token is at least one
        character, so a stop string of n characters lies within the last n tokens, and a few
        more keep it clear of the window's first piece, whose leading space decode drops."""
        window = max(len(stop) for stop in self.params.stop) + 4
        tail = decode(self.tokens[-window:])
        return any(stop in tail for stop in self.params.stop)


def _trimmable(cache: DynamicCache) -> bool:
    """Leading columns can be cut only from plain layers; sliding-window layers count theirs."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _select_cache(cache: DynamicCache, keep: torch.Tensor, drop_columns: int) -> None:
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            continue
        keys, values = keys[keep], values[keep]
        if drop_columns:
            keys, values = keys[:, :, drop_columns:], values[:, :, drop_columns:]
        layer.keys, layer.values = keys, values  # type: ignore[union-attr]


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    adapters: Sequence[str | None] | None = None,
    dropped: Dropped | None = None,
) -> list[Generation]:
    """Decode every prompt with its own sampling parameters and LoRA adapter (None: the
    base model), in one batch. The adapters must be loaded (`LoraCache.ensure`). Rows that
    `dropped` names stop where they are, with the finish reason CANCELLED."""
    device = loaded.device
    names = adapter_names(adapters if adapters is not None else [None] * len(prompts))
    if loaded.peft is None and set(names) != {BASE}:
        raise ValueError("a row names an adapter, but none is loaded")
    vocab = loaded.model.config.vocab_size
    context = loaded.spec.context_length
    eos_id = loaded.tokenizer.eos_id
    decode = loaded.tokenizer.decode
    # A prompt that leaves less room than max_tokens is capped and reports "length".
    rows = [
        _Row(list(ids), p, min(p.max_tokens, max(context - len(ids), 0)))
        for ids, p in zip(prompts, params, strict=True)
    ]
    active = [index for index, row in enumerate(rows) if row.finish is None]
    if not active:
        return _results(rows, decode)

    width = max(len(rows[i].prompt) for i in active)
    input_ids = torch.zeros((len(active), width), dtype=torch.long, device=device)
    attention = torch.zeros((len(active), width), dtype=torch.long, device=device)
    for slot, index in enumerate(active):
        ids = rows[index].prompt
        input_ids[slot, width - len(ids) :] = torch.tensor(ids, device=device)
        attention[slot, width - len(ids) :] = 1
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)

    tensors = SamplingTensors.from_params([rows[i].params for i in active], vocab, device)
    seen = (
        torch.zeros((len(active), vocab), device=device).scatter_add_(
            1, input_ids, attention.float()
        )
        > 0
    )
    counts = torch.zeros((len(active), vocab), dtype=torch.int32, device=device)
    cache = DynamicCache()
    step_ids, step_positions = input_ids, positions
    prefill = True
    while active:
        started = time.perf_counter()
        logits = _forward(
            loaded,
            [names[i] for i in active],
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        tokens = sample(logits, seen, counts, tensors)
        token_list = tokens.tolist()
        elapsed = time.perf_counter() - started
        # Each row's share: by prompt tokens for the prefill, one token each afterwards.
        weights = [len(rows[i].prompt) if prefill else 1 for i in active]
        for index, weight in zip(active, weights, strict=True):
            rows[index].seconds += elapsed * weight / sum(weights)
        prefill = False

        slots = torch.arange(len(active), device=device)
        seen[slots, tokens] = True
        counts[slots, tokens] += 1
        for index, token in zip(active, token_list, strict=True):
            rows[index].accept(token, eos_id, decode)
        for index in dropped() if dropped is not None else ():
            if rows[index].finish is None:
                rows[index].finish = CANCELLED

        step_ids = tokens.unsqueeze(1)
        step_positions = step_positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
        still = [slot for slot, index in enumerate(active) if rows[index].finish is None]
        if len(still) < len(active):
            if not still:
                break
            keep = torch.tensor(still, device=device)
            attention = attention[keep]
            # Columns that are padding in every remaining row need no more attention.
            drop = 0
            if _trimmable(cache):
                drop = int((attention == 0).all(dim=0).long().cumprod(dim=0).sum())
            attention = attention[:, drop:]
            _select_cache(cache, keep, drop)
            step_ids, step_positions = step_ids[keep], step_positions[keep]
            seen, counts = seen[keep], counts[keep]
            tensors = tensors.select(keep)
            active = [active[slot] for slot in still]
    return _results(rows, decode)


def _forward(loaded: LoadedModel, names: list[str], **inputs: Any) -> Any:
    if loaded.peft is None:
        return loaded.model(**inputs)
    # Once PEFT has injected its layers, a plain call would apply an adapter to every row.
    return loaded.peft(**inputs, adapter_names=names)


def _results(rows: list[_Row], decode: Decode) -> list[Generation]:
    return [
        Generation(
            token_ids=row.tokens,
            text=row.cut_text if row.cut_text is not None else decode(row.tokens),
            finish_reason=row.finish or "length",
            compute_seconds=row.seconds,
        )
        for row in rows
    ]
