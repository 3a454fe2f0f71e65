"""A KV cache of fixed slots, allocated once per batch and written in place.

Each layer holds keys and values as `[slots, kv_heads, max_len, head_dim]`. A slot holds one
row: its prompt, left-padded to the width of the prefill it came in with, then one column per
decoded token. Nothing is concatenated per step: a decode step scatters each row's new key and
value at its own column, and attention reads a view of the columns in use.

The cache does not know rows; the decode loop tells it, before each forward pass, where that
pass writes (`plan_prefill`, `plan_decode`), and builds the attention mask and positions from
each slot's first and next column (`decode_inputs`, `prefill_inputs`). The mask is 4D, which
transformers takes as given, so its own mask code runs no host sync.
"""

from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values; it writes where its cache's current plan says."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "SlotCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotCache allocates its layers when it is made")

    def allocate(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: Any) -> None:
        # Zeros, not empty: masked columns are still multiplied by their (zero) weight, and
        # uninitialised memory may hold NaN, which no mask hides.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Fixed addresses, updated in place: what a compiled step's CUDA graph needs.
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        plan = self.owner
        if plan.prefill_slots is not None:
            # New rows, left-padded to one width, start their slots: they attend only to
            # themselves, so the states just computed are what attention reads.
            width = key_states.shape[2]
            self.keys[:, :, :width].index_copy_(0, plan.prefill_slots, key_states)
            self.values[:, :, :width].index_copy_(0, plan.prefill_slots, value_states)
            return key_states, value_states
        rows, index = plan.rows, plan.write_index
        assert index is not None
        keys, values = self.keys[:rows], self.values[:rows]
        keys.scatter_(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]), key_states)
        values.scatter_(2, index.expand(-1, values.shape[1], -1, values.shape[3]), value_states)
        return keys[:, :, : plan.kv_len], values[:, :, : plan.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """Keys and values for `slots` rows of up to `max_len` columns each, in every layer."""

    def __init__(
        self,
        config: PretrainedConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        text = config.get_text_config()
        heads = text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        super().__init__(layers=[SlotLayer(self) for _ in range(text.num_hidden_layers)])
        self.slots, self.max_len = slots, max_len
        self.heads, self.head_dim = heads, head_dim
        self.dtype, self.device = dtype, device
        for layer in self.slot_layers:
            layer.allocate((slots, heads, max_len, head_dim), dtype, device)
        # Per slot, the columns that may hold keys and values of a row it held before.
        self.written = [0] * slots
        # The plan of the next forward pass: a prefill into these slots, or a decode step of
        # the first `rows` slots writing at `write_index` and reading `kv_len` columns.
        self.prefill_slots: torch.Tensor | None = None
        self.rows = 0
        self.write_index: torch.Tensor | None = None
        self.kv_len = 0

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlotLayer)]

    def plan_prefill(self, slots: list[int], width: int) -> None:
        """The next pass prefills `slots` (one per input row) with `width` columns each.

        What an earlier row left beyond them is zeroed: masked columns still meet a zero
        weight, and a non-finite value left there (an fp16 overflow, say) would turn it NaN."""
        if width > self.max_len:
            raise ValueError(f"a prefill of {width} columns, in slots of {self.max_len}")
        for slot in slots:
            if self.written[slot] > width:
                for layer in self.slot_layers:
                    assert layer.keys is not None and layer.values is not None
                    layer.keys[slot, :, width : self.written[slot]] = 0
                    layer.values[slot, :, width : self.written[slot]] = 0
            self.written[slot] = width
        self.prefill_slots = torch.tensor(slots, device=self.device)
        self.kv_len = width

    def release(self, slot: int, columns: int) -> None:
        """A row leaves `slot` having written its first `columns` columns."""
        self.written[slot] = max(self.written[slot], columns)

    def plan_decode(self, rows: int, columns: torch.Tensor, kv_len: int) -> None:
        """The next pass is a decode step of slots [0, rows): slot i writes at `columns[i]`
        and attends to its first `kv_len` columns (the mask says which are its own)."""
        if kv_len > self.max_len:
            raise ValueError(f"a decode step reading {kv_len} columns, in slots of {self.max_len}")
        self.prefill_slots, self.rows, self.kv_len = None, rows, kv_len
        self.write_index = columns.view(-1, 1, 1, 1)

    def move(self, sources: list[int], targets: list[int], columns: int) -> None:
        """Copy slots `sources` to slots `targets`, their first `columns` columns."""
        if not sources:
            return
        for source_slot, target_slot in zip(sources, targets, strict=True):
            self.written[target_slot] = max(self.written[target_slot], columns)
            self.written[source_slot] = max(self.written[source_slot], columns)
        self._copy_slots(sources, targets, columns)

    def copy(self, sources: list[int], targets: list[int], columns: int) -> None:
        """Start slots `targets` as copies of freshly prefilled slots `sources` (one source
        per target, repeated as need be), whose rows wrote their first `columns` columns.

        What a target held before, beyond them, becomes zero as a prefill would make it: each
        source is zero past its `columns` (its prefill cleared the rest), so the copy spans as
        far as any target was written."""
        if not sources:
            return
        span = max(columns, *(self.written[slot] for slot in targets))
        if span > self.max_len:
            raise ValueError(f"a copy of {span} columns, in slots of {self.max_len}")
        for target_slot in targets:
            self.written[target_slot] = columns
        self._copy_slots(sources, targets, span)

    def _copy_slots(self, sources: list[int], targets: list[int], columns: int) -> None:
        """Keys and values of slots `sources` into slots `targets`, their first `columns`."""
        source = torch.tensor(sources, device=self.device)
        target = torch.tensor(targets, device=self.device)
        for layer in self.slot_layers:
            assert layer.keys is not None and layer.values is not None
            for tensor in (layer.keys, layer.values):
                view = tensor[:, :, :columns]
                view.index_copy_(0, target, view.index_select(0, source))

    def grow(self, max_len: int) -> None:
        """Make every slot `max_len` columns long, keeping what they hold."""
        if max_len <= self.max_len:
            return
        for layer in self.slot_layers:
            assert layer.keys is not None and layer.values is not None
            keys, values = layer.keys, layer.values
            layer.allocate(
                (self.slots, self.heads, max_len, self.head_dim), self.dtype, self.device
            )
            layer.keys[:, :, : self.max_len] = keys
            layer.values[:, :, : self.max_len] = values
        self.max_len = max_len


def attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask as the attention implementation takes it: SDPA a boolean one, eager an
    additive one."""
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {implementation!r} is not supported")


def decode_inputs(
    first: torch.Tensor, next_column: torch.Tensor, kv_len: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask `[rows, 1, 1, kv_len]` and positions `[rows, 1]` of a decode step, for rows
    whose own columns run from `first` to `next_column`, where the new token goes.

    A row attends to its own columns up to and including the new one, and with a sliding
    window only to the last `window` positions, as Mistral's mask (`kv > q - window`)."""
    columns = torch.arange(kv_len, device=first.device)
    last = next_column.unsqueeze(1)
    allowed = (columns >= first.unsqueeze(1)) & (columns <= last)
    if window is not None:
        allowed &= columns > last - window
    positions = (next_column - first).unsqueeze(1)
    return allowed[:, None, None, :], positions


def prefill_inputs(
    lengths: list[int], width: int, window: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask `[rows, 1, width, width]` and positions `[rows, width]` of a prefill of prompts
    of these lengths, left-padded to `width`.

    Causal over each prompt's own columns. A padding column attends to itself alone: a query
    with no key at all would give NaN, which then reaches real rows through the values it
    leaves in the cache."""
    pad = width - torch.tensor(lengths, device=device).unsqueeze(1)  # [rows, 1]
    columns = torch.arange(width, device=device)
    query, key = columns.view(1, width, 1), columns.view(1, 1, width)
    allowed = (key >= pad.unsqueeze(2)) & (key <= query)
    if window is not None:
        allowed &= key > query - window
    allowed |= key == query
    positions = (columns.unsqueeze(0) - pad).clamp(min=0)
    return allowed.unsqueeze(1), positions
