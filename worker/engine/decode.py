"""The decode loop: one prefill over left-padded prompts, then one token per row per step."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from jobs.sampling import SamplingParams
from worker.engine.loader import LoadedModel
from worker.engine.sampler import SamplingTensors, sample


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    positions = [text.find(stop) for stop in stops]
    found = [pos for pos in positions if pos >= 0]
    return text[: min(found)] if found else None


@torch.inference_mode()
def generate(
    loaded: LoadedModel, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
) -> list[Generation]:
    """Decode every prompt with its own sampling parameters, in one batch."""
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    batch = len(prompts)
    vocab = model.config.vocab_size
    context = loaded.spec.context_length
    # A prompt that leaves less room than max_tokens is capped and reports "length".
    budgets = [
        min(p.max_tokens, max(context - len(ids), 0))
        for ids, p in zip(prompts, params, strict=True)
    ]

    width = max(len(ids) for ids in prompts)
    input_ids = torch.zeros((batch, width), dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, device=device)
        attention[row, width - len(ids) :] = 1
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)

    tensors = SamplingTensors.from_params(params, vocab, device)
    seen = (
        torch.zeros((batch, vocab), device=device).scatter_add_(1, input_ids, attention.float()) > 0
    )
    counts = torch.zeros((batch, vocab), dtype=torch.int32, device=device)

    outputs: list[list[int]] = [[] for _ in range(batch)]
    finish: list[str | None] = [None] * batch
    cut_texts: list[str | None] = [None] * batch
    cache = DynamicCache()
    step_ids, step_positions = input_ids, positions
    for row in range(batch):
        if budgets[row] == 0:
            finish[row] = "length"
    while any(reason is None for reason in finish):
        logits = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
        tokens = sample(logits, seen, counts, tensors)
        token_list = tokens.tolist()
        for row, token in enumerate(token_list):
            if finish[row] is not None:
                continue
            if token == tokenizer.eos_id:
                finish[row] = "stop"
                continue
            outputs[row].append(token)
            stops = params[row].stop
            if stops:
                cut = _cut_at_stop(tokenizer.decode(outputs[row]), stops)
                if cut is not None:
                    cut_texts[row], finish[row] = cut, "stop"
                    continue
            if len(outputs[row]) >= budgets[row]:
                finish[row] = "length"
        rows = torch.arange(batch, device=device)
        seen[rows, tokens] = True
        counts[rows, tokens] += 1
        step_ids = tokens.unsqueeze(1)
        step_positions = step_positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)

    return [
        Generation(
            token_ids=outputs[row],
            text=cut if (cut := cut_texts[row]) is not None else tokenizer.decode(outputs[row]),
            finish_reason=finish[row] or "length",
        )
        for row in range(batch)
    ]
