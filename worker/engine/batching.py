"""Forming static batches: which queued jobs run together, and in what groups.

Both functions are pure: the worker feeds them the rows it may claim, the benchmark its own
queue, and the tests fixed inputs.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def select_batch(
    candidates: Sequence[T],
    prompt_tokens: Callable[[T], int],
    max_tokens: Callable[[T], int],
    max_batch_size: int,
    max_batch_tokens: int,
    adapter: Callable[[T], str | None] = lambda _: None,
    max_adapters: int | None = None,
) -> list[T]:
    """The first candidate (the oldest, or the one a message names) and the candidates whose
    prompt lengths are nearest to it, up to the batch size, the token budget and the number
    of distinct adapters.

    The first candidate always goes, so no job waits behind newer ones for ever; choosing its
    neighbours by length keeps the batch's padding small. The budget is the most KV cache the
    batch can need: its rows times the longest prompt plus the longest max_tokens. A batch
    never needs more adapters than the worker keeps loaded at once.
    """
    if not candidates:
        return []
    anchor = candidates[0]
    length = prompt_tokens(anchor)
    chosen = [anchor]
    adapters = {adapter(anchor)} - {None}
    longest_prompt, longest_output = length, max_tokens(anchor)
    for candidate in sorted(candidates[1:], key=lambda c: abs(prompt_tokens(c) - length)):
        if len(chosen) >= max_batch_size:
            break
        prompt = max(longest_prompt, prompt_tokens(candidate))
        output = max(longest_output, max_tokens(candidate))
        # Padded, as the cache is laid out: every row as long as the longest of each part.
        if (len(chosen) + 1) * (prompt + output) > max_batch_tokens:
            continue
        name = adapter(candidate)
        if name is not None and name not in adapters:
            if max_adapters is not None and len(adapters) >= max_adapters:
                continue
            adapters.add(name)
        chosen.append(candidate)
        longest_prompt, longest_output = prompt, output
    return chosen


def plan_groups(
    items: Sequence[T], prompt_tokens: Callable[[T], int], max_padding: float, min_rows: int = 8
) -> list[list[T]]:
    """Sort by prompt length and split where padding would exceed `max_padding` of the real
    prompt tokens; each group is one batch. A group is not split below `min_rows`: a decode
    step of a few rows costs nearly what one of many does, so small groups waste more than
    padding does."""
    ordered = sorted(items, key=prompt_tokens)
    groups: list[list[T]] = []
    current: list[T] = []
    real = 0
    for item in ordered:
        length = prompt_tokens(item)
        padded = (len(current) + 1) * length  # sorted: this item is the longest so far
        if len(current) >= min_rows and padded > (1 + max_padding) * (real + length):
            groups.append(current)
            current, real = [], 0
        current.append(item)
        real += length
    if current:
        groups.append(current)
    return groups
