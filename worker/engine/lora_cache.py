"""The LoRA adapters loaded into a worker's model, least recently used evicted first.

PEFT reads, checks and maps each adapter's files: it injects LoRA layers into the model in
place, and the cache refuses an adapter whose weights PEFT would not load whole. Each loaded
adapter is then copied into a slot of the stacked weights of `lora_batched`, whose `forward`
serves a batch that mixes adapters in one gathered pass per layer. PEFT's layers keep no
active adapter, so a plain call of the model is the base model; its per-adapter path
(`loaded.peft(..., adapter_names=...)`, `"__base__"` for a row with none) still works.
"""

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load

from worker.engine.loader import LoadedModel
from worker.engine.lora_batched import BASE, attach, stack_adapter

log = logging.getLogger(__name__)

__all__ = ["BASE", "AdapterLoadError", "LoraCache", "adapter_names", "serving_config"]

Fetch = Callable[[], bytes]


class AdapterLoadError(Exception):
    """An adapter's files could not be made into LoRA layers of this model."""


class LoraCache:
    def __init__(self, loaded: LoadedModel, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("max_loras must be at least 1")
        self.loaded = loaded
        self.capacity = capacity
        self._resident: OrderedDict[str, None] = OrderedDict()
        # Adapters whose load failed while they were the only one: PEFT cannot drop its last
        # adapter, so they stay registered (never named by a row) until another one loads.
        self._broken: set[str] = set()
        self.loads = 0  # adapters loaded from their files over the cache's life
        # One slot more than the capacity: a new adapter loads before the old one leaves.
        self.slots = attach(loaded, capacity + 1)

    @property
    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._resident)

    def ensure(
        self, adapter_id: str, config: LoraConfig, fetch: Fetch, keep: Collection[str] = ()
    ) -> None:
        """Make an adapter usable, loading it on a miss. `config` is built from the checked
        upload, never taken from the stored file; `fetch` returns the bytes of its
        `adapter_model.safetensors`. Adapters in `keep` (the rest of the batch's) are never
        evicted to make room."""
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)
            return
        data = fetch()
        try:
            weights = {name: tensor.to(self.loaded.device) for name, tensor in load(data).items()}
        except Exception as exc:
            raise AdapterLoadError(f"the weights could not be read: {exc}") from exc
        try:
            self._load(adapter_id, config, weights)
            assert self.loaded.peft is not None
            stack_adapter(self.slots, self.loaded.peft, adapter_id)
        except Exception as exc:
            self._forget(adapter_id)
            if isinstance(exc, torch.OutOfMemoryError):
                raise  # not the adapter's fault: its jobs can run later
            raise AdapterLoadError(f"the adapter could not be loaded: {exc}") from exc
        self._resident[adapter_id] = None
        self.loads += 1
        log.info("loaded adapter %s (%d resident)", adapter_id, len(self._resident))
        for broken in list(self._broken):
            self._forget(broken)
        # Loaded before any eviction, so the model always keeps at least one adapter.
        self._evict(set(keep) | {adapter_id})

    def _load(self, adapter_id: str, config: LoraConfig, weights: dict[str, torch.Tensor]) -> None:
        # The wrapper exists before any weights load, and its layers never keep an active
        # adapter, so a failed load can touch no row on either path (PEFT's or the batched).
        # autocast_adapter_dtype=False keeps adapters in the model's dtype (bf16 on a GPU).
        if self.loaded.peft is None:
            peft = PeftModel(
                self.loaded.model, config, adapter_name=adapter_id, autocast_adapter_dtype=False
            )
            peft.eval()  # mixed-adapter batches are refused in training mode
            self.loaded.peft = peft
            self._deactivate()
        else:
            try:
                self.loaded.peft.add_adapter(adapter_id, config, autocast_adapter_dtype=False)
            finally:
                self._deactivate()
            self.loaded.peft.eval()
        result: Any = set_peft_model_state_dict(self.loaded.peft, weights, adapter_name=adapter_id)
        missing = [key for key in result.missing_keys if f".{adapter_id}." in key]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{len(missing)} LoRA weights missing, "
                f"{len(result.unexpected_keys)} not of this model "
                f"(e.g. {(missing + list(result.unexpected_keys))[0]})"
            )

    def _deactivate(self) -> None:
        """Leave PEFT's layers with no active adapter: PEFT activates one whenever adapters
        come or go, and an active adapter would apply to every row of a plain call of the
        model (the batched forward's). Rows name their adapters on PEFT's own path. PEFT's
        own record still names a registered adapter as active, as its forward expects."""
        peft = self.loaded.peft
        assert peft is not None
        if peft.peft_config:
            peft.set_adapter(next(iter(peft.peft_config)), inference_mode=True)
        for module in peft.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter([], inference_mode=True)

    def _forget(self, adapter_id: str) -> None:
        """Drop an adapter that failed to load, or mark it for later if it is the only one."""
        self.slots.release(adapter_id)
        peft = self.loaded.peft
        if peft is None or adapter_id not in peft.peft_config:
            self._broken.discard(adapter_id)
            return
        if len(peft.peft_config) == 1:
            self._broken.add(adapter_id)
            return
        self._delete(adapter_id)
        self._broken.discard(adapter_id)

    def _delete(self, adapter_id: str) -> None:
        assert self.loaded.peft is not None
        with warnings.catch_warnings():  # "the active adapter was deleted": none is used
            warnings.simplefilter("ignore", UserWarning)
            self.loaded.peft.delete_adapter(adapter_id)
        self.slots.release(adapter_id)
        self._deactivate()

    def _evict(self, keep: set[str]) -> None:
        for adapter_id in list(self._resident):
            if len(self._resident) <= self.capacity:
                return
            if adapter_id in keep:
                continue
            self._delete(adapter_id)
            del self._resident[adapter_id]
            log.info("evicted adapter %s", adapter_id)


def serving_config(rank: int, alpha: float, target_modules: Sequence[str]) -> LoraConfig:
    """The LoRA config an adapter is served with: only what upload checked. Anything else a
    stored config could say (other initialisations, layer replication, rank patterns) would
    change the shared base model or other adapters' rows, so none of it is read."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT divides it by r: a float serves
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        inference_mode=True,
    )


def adapter_names(adapters: Collection[str | None]) -> list[str]:
    """PEFT's per-row adapter names: `"__base__"` for a row that has none."""
    return [adapter or BASE for adapter in adapters]
