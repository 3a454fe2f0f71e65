"""Batched LoRA: each row of a batch with its own adapter, in one gathered pass per projection.

The resident adapters' weights are stacked per target linear layer: `lora_a[slot]` is the
adapter's A transposed (`[in, r_max]`), `lora_b[slot]` its B transposed with `alpha / r`
folded in (`[r_max, out]`). Slot 0 stays zero: it is the base model's. A smaller rank is
zero-padded, which adds exact zeros. Every adapter has the same slot in every layer, so one
index tensor per batch (a slot per row) serves all of them, and a layer computes

    y = x @ W.T + b + (x @ lora_a[idx]) @ lora_b[idx]        (bmm, then baddbmm)

whatever the number of distinct adapters among the rows (S-LoRA / Punica's BGMV idea, in
plain torch). A forward with no index (every row on the base model) is the plain linear layer.

The gather copies each row's A and B for the step (rows x r_max x (in + out) per layer, freed
as the layer finishes), so the work grows with rows and rank, never with the number of
distinct adapters.

PEFT still reads, checks and maps the adapter files (`LoraCache`); its layers stay in the
model for its own per-adapter path (`loaded.peft(..., adapter_names=...)`) but keep no active
adapter, so in a plain call of the model they add nothing. The stacked layers sit beneath
PEFT's (they are its `base_layer`), so both paths share the base weights.
"""

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional

from worker.engine.loader import LoadedModel

# The adapter name of a row that has none (the name PEFT's mixed batches use, too).
BASE = "__base__"
BASE_SLOT = 0


class AdapterSlots:
    """The slot of each resident adapter, the layers that hold stacked weights, and the rows'
    slots for the forward pass under way (None outside one, or when every row is base)."""

    def __init__(self, slots: int) -> None:
        self.capacity = slots  # slots the stacks are sized for; grown if more are resident
        self.slot_of: dict[str, int] = {}
        self.layers: list[BatchedLoraLinear] = []
        self.indices: torch.Tensor | None = None
        self.version = 0  # changes whenever an adapter takes or leaves a slot
        self._cached: tuple[int, tuple[str, ...], torch.Tensor] | None = None

    def assign(self, adapter_id: str) -> int:
        """A slot for an adapter about to be stacked: the lowest free one."""
        if adapter_id in self.slot_of:
            raise ValueError(f"adapter {adapter_id} already has a slot")
        taken = set(self.slot_of.values())
        slot = next(s for s in range(1, len(taken) + 2) if s not in taken)
        self.slot_of[adapter_id] = slot
        if slot > self.capacity:
            # More adapters resident than the cache's capacity (a batch keeps its own): every
            # layer grows, so that no row's index falls outside a stack.
            self.capacity = 2 * self.capacity
            for layer in self.layers:
                layer.grow(self.capacity, layer.rank)
        self.version += 1
        return slot

    def release(self, adapter_id: str) -> None:
        """Zero an adapter's slot in every layer and free it; nothing if it has none."""
        slot = self.slot_of.pop(adapter_id, None)
        if slot is None:
            return
        with _stack_writes():
            for layer in self.layers:
                layer.clear(slot)
        self.version += 1

    def row_indices(self, names: Sequence[str], device: torch.device) -> torch.Tensor:
        """Each row's slot, on the device; the last answer is kept while the rows' names and
        the slots stay the same, so a steady batch copies nothing to the device per step."""
        key = tuple(names)
        if self._cached is not None and self._cached[:2] == (self.version, key):
            return self._cached[2]
        slots = []
        for name in names:
            if name == BASE:
                slots.append(BASE_SLOT)
            elif name in self.slot_of:
                slots.append(self.slot_of[name])
            else:
                raise ValueError(f"a row names adapter {name!r}, which is not loaded")
        indices = torch.tensor(slots, dtype=torch.long, device=device)
        self._cached = (self.version, key, indices)
        return indices


class BatchedLoraLinear(nn.Linear):
    """A linear layer of the base model (sharing its weight and bias) plus the stacked LoRA
    weights of every resident adapter that targets it. Still an `nn.Linear`, so PEFT wraps
    it like the layer it replaces."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, linear: nn.Linear, slots: AdapterSlots) -> None:
        nn.Module.__init__(self)  # no weights of its own: it shares the layer's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The same Parameter objects: both paths, and the checkpoint, see one set of weights.
        self.register_parameter("weight", cast(nn.Parameter, linear.weight))
        self.register_parameter("bias", cast(nn.Parameter | None, linear.bias))
        self.slots = slots  # shared by every stacked layer of the model
        self.used: set[int] = set()  # slots with weights here
        # Not in the state dict: the model's checkpoint keys stay what they were.
        empty = torch.zeros(0, device=linear.weight.device, dtype=linear.weight.dtype)
        self.register_buffer("lora_a", empty.new_zeros((1, self.in_features, 0)), persistent=False)
        self.register_buffer("lora_b", empty.new_zeros((1, 0, self.out_features)), persistent=False)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.linear(x, self.weight, self.bias)
        indices = self.slots.indices
        if indices is None or not self.used:
            return out
        # Per row its adapter's A and B, gathered from the stacks: a row on slot 0 adds zeros.
        # (Indexing records fewer ops per call than index_select: 15 per layer, not 19.)
        a, b = self.lora_a[indices], self.lora_b[indices]
        if x.dim() == 3:
            return torch.baddbmm(out, torch.bmm(x, a), b)
        rows = x.reshape(indices.shape[0], -1, self.in_features)
        flat = out.reshape(indices.shape[0], -1, self.out_features)
        return torch.baddbmm(flat, torch.bmm(rows, a), b).reshape(out.shape)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Stack one adapter's A `[r, in]` and B `[out, r]` in `slot`, in place when the
        stacks are large enough (rank and slot count only ever grow)."""
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(f"LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit {self}")
        self.grow(max(slot, self.slots.capacity), rank)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :, :rank].copy_(a.transpose(0, 1))
        # Scaled in fp32, rounded once to the model's dtype.
        self.lora_b[slot, :rank, :].copy_((b.float() * scaling).transpose(0, 1))
        self.used.add(slot)

    def clear(self, slot: int) -> None:
        if slot in self.used:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.used.discard(slot)

    def grow(self, slots: int, rank: int) -> None:
        """Room for `slots` adapters of rank `rank`; the stacks are copied only if they grow."""
        old_slots, old_rank = self.lora_a.shape[0] - 1, self.rank
        if slots <= old_slots and rank <= old_rank:
            return
        slots, rank = max(slots, old_slots), max(rank, old_rank)
        lora_a = self.lora_a.new_zeros((slots + 1, self.in_features, rank))
        lora_b = self.lora_b.new_zeros((slots + 1, rank, self.out_features))
        lora_a[: old_slots + 1, :, :old_rank] = self.lora_a
        lora_b[: old_slots + 1, :old_rank, :] = self.lora_b
        self.lora_a, self.lora_b = lora_a, lora_b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={sorted(self.used)}, rank={self.rank}"


# The slots of each served model; kept beside the model rather than in LoadedModel, whose
# module is not this one's to change.
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, AdapterSlots]" = weakref.WeakKeyDictionary()


def attach(loaded: LoadedModel, slots: int) -> AdapterSlots:
    """The model's adapter slots, made on first use, sized for `slots` adapters."""
    found = _SLOTS.get(loaded.model)
    if found is None:
        found = _SLOTS[loaded.model] = AdapterSlots(slots)
    return found


def adapter_slots(loaded: LoadedModel) -> AdapterSlots | None:
    return _SLOTS.get(loaded.model)


@contextmanager
def _stack_writes() -> Iterator[None]:
    """Stacks are made and written outside inference mode, so that they stay ordinary tensors
    that later loads may update in place, whatever mode the caller is in."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def stack_adapter(slots: AdapterSlots, peft_model: nn.Module, adapter_id: str) -> None:
    """Copy an adapter that PEFT has just loaded into a slot of the stacks, putting a stacked
    layer beneath each PEFT layer it targets (once per layer, on first use)."""
    targets: list[tuple[LoraLinear, BatchedLoraLinear]] = []
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or adapter_id not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or adapter_id in module.lora_variant:
            raise ValueError(f"{type(module).__name__} layers cannot be batched")
        base = module.base_layer
        if not isinstance(base, BatchedLoraLinear):
            if type(base) is not nn.Linear:
                raise ValueError(f"a {type(base).__name__} base layer cannot be batched")
            base = BatchedLoraLinear(base, slots)
            module.base_layer = base
            slots.layers.append(base)
        targets.append((module, base))
    if not targets:
        raise ValueError("the adapter targets no layer of this model")
    try:
        with _stack_writes():
            slot = slots.assign(adapter_id)
            for module, base in targets:
                base.put(
                    slot,
                    _weight(module.lora_A[adapter_id]),
                    _weight(module.lora_B[adapter_id]),
                    float(module.scaling[adapter_id]),
                )
    except BaseException:
        slots.release(adapter_id)
        raise


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(layer).__name__} has no weight tensor")
    return weight


def row_indices(loaded: LoadedModel, names: Sequence[str]) -> torch.Tensor:
    """Each row's adapter slot (0 for `BASE`), on the model's device. A decode loop can keep
    it per batch and pass it to `forward_indexed` until rows join or leave."""
    slots = adapter_slots(loaded)
    if slots is None:
        if any(name != BASE for name in names):
            raise ValueError("a row names an adapter, but none is loaded")
        return torch.zeros(len(names), dtype=torch.long, device=loaded.device)
    return slots.row_indices(names, loaded.device)


def forward_indexed(loaded: LoadedModel, indices: torch.Tensor | None, **inputs: Any) -> Any:
    """The base model's forward with each row's adapter by slot (`row_indices`); None when
    every row is on the base model, which then costs nothing beyond the base model."""
    slots = adapter_slots(loaded)
    if indices is None or slots is None:
        return loaded.model(**inputs)
    slots.indices = indices
    try:
        return loaded.model(**inputs)
    finally:
        slots.indices = None


def forward(loaded: LoadedModel, names: Sequence[str], **inputs: Any) -> Any:
    """The model's forward with each row's adapter by name (`BASE` for none): what decode's
    `_forward(loaded, names, **inputs)` computes through PEFT, in one gathered pass per layer."""
    if all(name == BASE for name in names):
        return forward_indexed(loaded, None, **inputs)
    return forward_indexed(loaded, row_indices(loaded, names), **inputs)
