"""The LoRA adapters loaded into a worker's model, least recently used evicted first.

PEFT injects LoRA layers into the model in place. From the first adapter on, every forward
pass names each row's adapter (`adapter_names`, `"__base__"` for a row with none); PEFT runs
that as one pass of the base layers plus one small pass per distinct adapter in the batch, so
one static batch serves several adapters and the base model together.
"""

import logging
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file

from worker.engine.loader import LoadedModel

log = logging.getLogger(__name__)

BASE = "__base__"

Fetch = Callable[[Path], None]


class AdapterLoadError(Exception):
    """An adapter's files could not be made into LoRA layers of this model."""


class LoraCache:
    def __init__(self, loaded: LoadedModel, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("max_loras must be at least 1")
        self.loaded = loaded
        self.capacity = capacity
        self._resident: OrderedDict[str, None] = OrderedDict()
        self.loads = 0  # adapters loaded from their files over the cache's life

    @property
    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._resident)

    def ensure(self, adapter_id: str, fetch: Fetch, keep: Collection[str] = ()) -> None:
        """Make an adapter usable, loading it on a miss: `fetch` writes its PEFT files
        (`adapter_config.json`, `adapter_model.safetensors`) into the folder it is given.
        Adapters in `keep` (the rest of the batch's) are never evicted to make room."""
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)
            return
        with tempfile.TemporaryDirectory(prefix="mbatch-lora-") as folder:
            fetch(Path(folder))
            try:
                # Read once on its own first: a file that is not safetensors fails here,
                # before PEFT has injected anything into the model.
                load_file(Path(folder) / "adapter_model.safetensors")
                self._load(adapter_id, Path(folder))
            except Exception as exc:
                self._forget(adapter_id)
                raise AdapterLoadError(f"the adapter could not be loaded: {exc}") from exc
        self._resident[adapter_id] = None
        self.loads += 1
        # Loaded before any eviction, so the model always keeps at least one adapter.
        self._evict(set(keep) | {adapter_id})

    def _load(self, adapter_id: str, folder: Path) -> None:
        # autocast_adapter_dtype=False keeps the adapter in the model's dtype (bf16 on a
        # GPU): PEFT would otherwise upcast it to fp32 and every LoRA pass with it.
        if self.loaded.peft is None:
            peft = PeftModel.from_pretrained(
                self.loaded.model,
                folder,
                adapter_name=adapter_id,
                is_trainable=False,
                autocast_adapter_dtype=False,
            )
            peft.eval()  # mixed-adapter batches are refused in training mode
            self.loaded.peft = peft
        else:
            self.loaded.peft.load_adapter(
                folder, adapter_name=adapter_id, is_trainable=False, autocast_adapter_dtype=False
            )
        log.info("loaded adapter %s (%d resident)", adapter_id, len(self._resident) + 1)

    def _forget(self, adapter_id: str) -> None:
        """Drop what a failed load left behind."""
        peft = self.loaded.peft
        if peft is not None and adapter_id in peft.peft_config and len(peft.peft_config) > 1:
            peft.delete_adapter(adapter_id)

    def _evict(self, keep: set[str]) -> None:
        for adapter_id in list(self._resident):
            if len(self._resident) <= self.capacity:
                return
            if adapter_id in keep:
                continue
            assert self.loaded.peft is not None
            with warnings.catch_warnings():  # "the active adapter was deleted": none is used
                warnings.simplefilter("ignore", UserWarning)
                self.loaded.peft.delete_adapter(adapter_id)
            del self._resident[adapter_id]
            log.info("evicted adapter %s", adapter_id)


def adapter_names(adapters: Collection[str | None]) -> list[str]:
    """PEFT's per-row adapter names: `"__base__"` for a row that has none."""
    return [adapter or BASE for adapter in adapters]
