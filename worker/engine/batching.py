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
) -> list[T]:
    """The first candidate (the oldest, or the one a message names) and the candidates whose
    prompt lengths are nearest to it, up to the batch size and the token budget.

    The first candidate always goes, so no job waits behind newer ones for ever; choosing its
    neighbours by length keeps the batch's padding small. The budget counts each job's prompt
    plus its max_tokens, the most KV cache it can need.
    """
    if not candidates:
        return []
    anchor = candidates[0]
    length = prompt_tokens(anchor)
    chosen = [anchor]
    budget = length + max_tokens(anchor)
    for candidate in sorted(candidates[1:], key=lambda c: abs(prompt_tokens(c) - length)):
        if len(chosen) >= max_batch_size:
            break
        need = prompt_tokens(candidate) + max_tokens(candidate)
        if budget + need > max_batch_tokens:
            continue
        chosen.append(candidate)
        budget += need
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
