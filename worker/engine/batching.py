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
    tier: Callable[[T], int] = lambda _: 0,
    bulk: Callable[[T], bool] = lambda _: False,
    max_bulk: int | None = None,
) -> list[T]:
    """The first candidate (the first in the lanes' and owners' turns, or the one a message
    names) and the candidates whose
    prompt lengths are nearest to it, up to the batch size, the token budget and the number
    of distinct adapters.

    The first candidate always goes, so no job waits behind newer ones for ever; choosing its
    neighbours by length keeps the batch's padding small. The budget is the most KV cache the
    batch can need: its rows times the longest prompt plus the longest max_tokens. A batch
    never needs more adapters than the worker keeps loaded at once.

    Neighbours are taken by `tier` first (lower first: the lanes' and owners' turns,
    `worker.fairness`), by length within a tier, so that the length never lets a lower tier
    pass a higher one; and no more than `max_bulk` rows (the first included) for which
    `bulk` holds (the slots kept for interactive jobs).
    """
    if not candidates:
        return []
    anchor = candidates[0]
    length = prompt_tokens(anchor)
    chosen = [anchor]
    adapters = {adapter(anchor)} - {None}
    bulk_rows = int(bulk(anchor))
    longest_prompt, longest_output = length, max_tokens(anchor)
    neighbours = sorted(candidates[1:], key=lambda c: (tier(c), abs(prompt_tokens(c) - length)))
    for candidate in neighbours:
        if len(chosen) >= max_batch_size:
            break
        is_bulk = bulk(candidate)
        if is_bulk and max_bulk is not None and bulk_rows >= max_bulk:
            continue
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
        bulk_rows += is_bulk
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
