"""The LoRA adapters a batch needs: fetched from storage, checked, and loaded into the cache."""

import logging

from jobs import loras
from jobs.outages import unavailable
from worker.claims import ClaimedRow
from worker.engine.loader import LoadedModel
from worker.engine.lora_cache import AdapterLoadError, LoraCache, serving_config
from worker.results import Results
from worker.services import Services

log = logging.getLogger(__name__)


class AdapterUnavailable(Exception):
    """A job's adapter was deleted, or its files cannot be loaded: the job fails alone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Adapters:
    """The adapters of this worker's model, as many at once as the cache holds."""

    def __init__(self, loaded: LoadedModel, services: Services, results: Results) -> None:
        self.cache = LoraCache(loaded, services.settings.max_loras)
        self.session_scope = services.session_scope
        self.storage = services.storage
        self.results = results

    def load(self, rows: list[ClaimedRow]) -> list[ClaimedRow]:
        """Load the adapters the rows need; the rows of one that cannot be used fail (or,
        when storage or the database is away for a moment, are given back), and only they.
        Returns the rows that can run."""
        needed = {row.adapter for row in rows if row.adapter is not None}
        unusable: set[str] = set()
        for adapter_id in sorted(needed):
            mine = [row.claim for row in rows if row.adapter == adapter_id]
            try:
                self._ensure(adapter_id, keep=needed)
            except AdapterUnavailable as exc:
                log.warning("adapter %s cannot be used: %s", adapter_id, exc)
                self.results.fail(mine, exc.code, str(exc))
            except Exception as exc:  # storage or the database away, out of memory...
                log.exception("could not load adapter %s for now; giving its jobs back", adapter_id)
                if unavailable(exc) is not None:
                    self.results.return_for_outage(mine)
                else:
                    self.results.give_back(mine, repr(exc))
            else:
                continue
            unusable.add(adapter_id)
        return [row for row in rows if row.adapter not in unusable]

    def _ensure(self, adapter_id: str, keep: set[str]) -> None:
        with self.session_scope() as session:
            adapter = loras.get_adapter(session, adapter_id)
            if adapter is not None:
                session.expunge(adapter)
        if adapter is None:
            raise AdapterUnavailable(
                "lora_not_found", f"adapter {adapter_id} was deleted after the job was submitted"
            )

        def fetch() -> bytes:
            try:
                data = self.storage.get_bytes(loras.weights_key(adapter))
            except KeyError:
                raise AdapterUnavailable(
                    "lora_not_found", f"the files of adapter {adapter_id} are gone"
                ) from None
            if not loras.weights_match(adapter, data):
                raise AdapterUnavailable(
                    "lora_load_failed",
                    f"the stored weights of adapter {adapter_id} do not match their sha256",
                )
            return data

        # Served with what upload checked, from the row, not with the stored config file.
        config = serving_config(adapter.rank, adapter.alpha, adapter.target_modules)
        try:
            self.cache.ensure(adapter_id, config, fetch, keep)
        except AdapterLoadError as exc:
            raise AdapterUnavailable("lora_load_failed", f"adapter {adapter_id}: {exc}") from exc
