"""What a worker process does with its one loaded model: claim, decode, record, maintain."""

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.orm import Session

from jobs import batches, queries
from jobs.loras import WEIGHTS_FIELD
from jobs.maintenance import repeat, run_pass
from jobs.models import Job, LoraAdapter
from jobs.outages import unavailable
from jobs.pricing import price
from jobs.queries import Claim, Outcome
from jobs.queue import JobQueue
from jobs.sampling import SamplingParams
from jobs.service import publish
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.tokenizer import encode_job_input
from worker.engine.batching import plan_groups, select_batch
from worker.engine.decode import CANCELLED, Generation, generate
from worker.engine.loader import LoadedModel
from worker.engine.lora_cache import AdapterLoadError, LoraCache, serving_config

log = logging.getLogger(__name__)

# How often a worker asks whether the jobs it is decoding were cancelled meanwhile.
CLAIM_CHECK_SECONDS = 1.0

SessionScope = Callable[[], AbstractContextManager[Session]]


def result_key(job_id: str) -> str:
    return f"results/{job_id}.txt"


def place_response(
    storage: Storage, job_id: str, text: str, inline_max_bytes: int
) -> tuple[str | None, str | None]:
    """Where a response is kept: `(text, None)` in the row, or `(None, key)` in object storage.

    Large responses go to storage, and so does any with a NUL character, which a model can
    emit (byte-fallback `<0x00>`) and Postgres text cannot hold.
    """
    if len(text.encode()) <= inline_max_bytes and "\x00" not in text:
        return text, None
    key = result_key(job_id)
    storage.put_bytes(key, text.encode())
    return None, key


@dataclass(frozen=True)
class _ClaimedRow:
    claim: Claim
    prompt: list[int]
    params: SamplingParams

    @property
    def adapter(self) -> str | None:
        return self.claim.job.lora_id


class AdapterUnavailable(Exception):
    """A job's adapter was deleted, or its files cannot be loaded: the job fails alone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel,
        session_scope: SessionScope,
        storage: Storage,
        queue: JobQueue,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.loaded = loaded
        self.session_scope = session_scope
        self.storage = storage
        self.queue = queue
        self.worker_id = worker_id
        self.loras = LoraCache(loaded, settings.max_loras)
        self._running: list[Claim] = []
        # Jobs of the running batch that were cancelled or taken from us: not decoded further.
        self._lost: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def model_name(self) -> str:
        return self.loaded.spec.name

    def handle_message(self, job_id: str) -> int:
        """Run the batch that a message wakes us for; returns how many jobs it recorded.

        The message only says there is work: the batch is formed from what is queued for
        this model in Postgres, the message's own job first. A job already claimed or
        finished is skipped, which is what makes a repeated message harmless.
        """
        with self.session_scope() as session:
            mine = queries.is_queued(session, job_id)
            if not mine and not queries.count_queued(session, self.model_name):
                return 0  # run by an earlier batch, and nothing else waits: nothing to do
        self._wait_for_stragglers()
        # A message is published per batch's worth of a bulk submission, not per job, so
        # one whose job has gone still runs a batch of whatever is queued.
        claims = self._claim(first_id=job_id if mine else None)
        return self.run_claims(claims) if claims else 0

    def drain(self, on_batch: Callable[[list[Claim]], None] | None = None) -> int:
        """Run batches until nothing is queued for this model (the one-process pipeline)."""
        done = 0
        while True:
            claims = self._claim()
            if not claims:
                return done
            done += self.run_claims(claims)
            if on_batch is not None:
                on_batch(claims)

    def _wait_for_stragglers(self) -> None:
        """Give a batch that is not full a bounded moment to fill: until it is full, until
        jobs stop arriving, or until batch_wait_ms have passed."""
        started = time.monotonic()
        deadline = started + self.settings.batch_wait_ms / 1000
        quiet = self.settings.batch_quiet_ms / 1000
        last_count, last_change = -1, started
        while (now := time.monotonic()) < deadline:
            with self.session_scope() as session:
                count = queries.count_queued(session, self.model_name)
            if count >= self.settings.max_batch_size:
                return
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= quiet:
                return
            time.sleep(0.02)

    def _choose(self, candidates: list[Job]) -> list[Job]:
        return select_batch(
            candidates,
            prompt_tokens=lambda job: job.prompt_tokens,
            max_tokens=lambda job: int(job.sampling["max_tokens"]),
            max_batch_size=self.settings.max_batch_size,
            max_batch_tokens=self.settings.max_batch_tokens,
            adapter=lambda job: job.lora_id,
            max_adapters=self.settings.max_loras,
        )

    def _claim(self, first_id: str | None = None) -> list[Claim]:
        with self.session_scope() as session:
            return queries.claim_batch(
                session,
                self.model_name,
                self.worker_id,
                self.settings.lease_seconds,
                self.settings.max_batch_size * self.settings.claim_lookahead,
                first_id=first_id,
                choose=self._choose,
            )

    def run_claims(self, claims: list[Claim]) -> int:
        with self._lock:
            self._running = list(claims)
        try:
            rows = self._prepare(claims)
            groups = plan_groups(rows, lambda row: len(row.prompt), self.settings.max_padding)
            recorded = sum(self._run_group(group) for group in groups)
        finally:
            with self._lock:
                self._running, self._lost = [], frozenset()
        self._finalize_file_batches(claims)
        return recorded

    def _finalize_file_batches(self, claims: list[Claim]) -> None:
        """A file batch whose last lines just ran gets its output files now, not at the next
        maintenance pass; one that has spent its max_cost stops."""
        batch_ids = {c.job.file_batch_id for c in claims if c.job.file_batch_id is not None}
        try:
            with self.session_scope() as session:
                batches.enforce_max_cost(session, batch_ids)
            batches.finalize_if_done(self.session_scope, self.storage, self.settings, batch_ids)
        except Exception:  # maintenance finalizes it later
            log.exception("could not finalize batches %s", sorted(batch_ids))

    def _prepare(self, claims: list[Claim]) -> list[_ClaimedRow]:
        rows = []
        for claim in claims:
            try:
                prompt = encode_job_input(self.loaded.tokenizer, claim.job.input)
                params = SamplingParams.from_dict(claim.job.sampling)
            except Exception as exc:  # a bad stored job fails alone; its batch mates run
                with self.session_scope() as session:
                    queries.record_failure(session, claim, "invalid_job", str(exc))
                continue
            rows.append(_ClaimedRow(claim, prompt, params))
        return self._load_adapters(rows)

    def _load_adapters(self, rows: list[_ClaimedRow]) -> list[_ClaimedRow]:
        """Load the adapters the rows need; the rows of one that cannot be used fail (or,
        when storage or the database is away for a moment, are given back), and only they."""
        needed = {row.adapter for row in rows if row.adapter is not None}
        unusable: set[str] = set()
        for adapter_id in sorted(needed):
            mine = [row.claim for row in rows if row.adapter == adapter_id]
            try:
                self._ensure_adapter(adapter_id, keep=needed)
            except AdapterUnavailable as exc:
                log.warning("adapter %s cannot be used: %s", adapter_id, exc)
                with self.session_scope() as session:
                    for claim in mine:
                        queries.record_failure(session, claim, exc.code, str(exc))
            except Exception as exc:  # storage or the database away, out of memory...
                log.exception("could not load adapter %s for now; giving its jobs back", adapter_id)
                if unavailable(exc) is not None:
                    self._return_for_outage(mine)
                else:
                    self._give_back(mine, repr(exc))
            else:
                continue
            unusable.add(adapter_id)
        return [row for row in rows if row.adapter not in unusable]

    def _ensure_adapter(self, adapter_id: str, keep: set[str]) -> None:
        with self.session_scope() as session:
            adapter = session.get(LoraAdapter, adapter_id)
            if adapter is not None:
                session.expunge(adapter)
        if adapter is None:
            raise AdapterUnavailable(
                "lora_not_found", f"adapter {adapter_id} was deleted after the job was submitted"
            )

        def fetch() -> bytes:
            try:
                data = self.storage.get_bytes(f"{adapter.storage_prefix}/{WEIGHTS_FIELD}")
            except KeyError:
                raise AdapterUnavailable(
                    "lora_not_found", f"the files of adapter {adapter_id} are gone"
                ) from None
            if hashlib.sha256(data).hexdigest() != adapter.sha256:
                raise AdapterUnavailable(
                    "lora_load_failed",
                    f"the stored weights of adapter {adapter_id} do not match their sha256",
                )
            return data

        # Served with what upload checked, from the row, not with the stored config file.
        config = serving_config(adapter.rank, adapter.alpha, adapter.target_modules)
        try:
            self.loras.ensure(adapter_id, config, fetch, keep)
        except AdapterLoadError as exc:
            raise AdapterUnavailable("lora_load_failed", f"adapter {adapter_id}: {exc}") from exc

    def _run_group(self, group: list[_ClaimedRow]) -> int:
        started = time.perf_counter()
        try:
            generations = generate(
                self.loaded,
                [row.prompt for row in group],
                [row.params for row in group],
                [row.adapter for row in group],
                dropped=lambda: self._dropped_rows(group),
            )
        except Exception as exc:
            if len(group) > 1:
                # Out of memory, or one row the engine cannot take: halves find out which,
                # without spending every batch mate's attempts.
                log.exception("batch of %d failed; running it in halves", len(group))
                half = len(group) // 2
                return self._run_group(group[:half]) + self._run_group(group[half:])
            log.exception("job %s failed in the engine; giving it back", group[0].claim.job.id)
            self._give_back([row.claim for row in group], repr(exc))
            return 0
        decoded = time.perf_counter() - started
        recorded = sum(
            self._record(row, generation)
            for row, generation in zip(group, generations, strict=True)
        )
        log.info(
            "batch of %d: %d tokens decoded in %.2f s, recorded in %.2f s",
            len(group),
            sum(len(g.token_ids) for g in generations),
            decoded,
            time.perf_counter() - started - decoded,
        )
        return recorded

    def _dropped_rows(self, group: list[_ClaimedRow]) -> list[int]:
        lost = self._lost
        if not lost:
            return []
        return [index for index, row in enumerate(group) if row.claim.job.id in lost]

    def _record(self, row: _ClaimedRow, generation: Generation) -> bool:
        """Record one result. A job whose result cannot be stored fails alone, at once; one
        whose database or storage is away for a moment is given back to run again, without
        spending an attempt."""
        if generation.finish_reason == CANCELLED:
            log.info("job %s was cancelled or reclaimed mid-decode; stopped", row.claim.job.id)
            return False
        try:
            with self.session_scope() as session:
                if queries.record_success(session, row.claim, self._outcome(row, generation)):
                    return True
                log.info("job %s was cancelled or reclaimed; result dropped", row.claim.job.id)
                return False
        except Exception as exc:
            if (down := unavailable(exc)) is not None:
                log.warning(
                    "job %s not recorded (%s is unavailable); given back", row.claim.job.id, down
                )
                self._return_for_outage([row.claim])
                return False
            if isinstance(exc, BotoCoreError | ClientError | OSError):
                # Refused by storage (access denied, say): tried again, within max_attempts.
                log.exception("could not store job %s's result; giving it back", row.claim.job.id)
                self._give_back([row.claim], repr(exc))
                return False
            log.exception("could not record the result of job %s", row.claim.job.id)
            with self.session_scope() as session:
                queries.record_failure(
                    session,
                    row.claim,
                    "result_not_stored",
                    f"the result could not be stored: {exc}",
                )
            return False

    def _return_for_outage(self, claims: list[Claim]) -> None:
        """Give jobs back, at no cost to their attempts, to run once the outage is over. If
        the database is down too, their leases lapse and maintenance gives them back."""
        try:
            with self.session_scope() as session:
                queries.return_claims(session, claims, self.settings.outage_retry_seconds)
        except Exception:
            log.exception("could not give back %d jobs; their leases will lapse", len(claims))

    def _give_back(self, claims: list[Claim], reason: str) -> None:
        with self.session_scope() as session:
            requeued = queries.release_claims(session, claims, self.settings.max_attempts, reason)
            publish(session, self.queue, requeued)

    def _outcome(self, row: _ClaimedRow, generation: Generation) -> Outcome:
        cost = price(self.loaded.spec, len(row.prompt), len(generation.token_ids))
        text, uri = place_response(
            self.storage, row.claim.job.id, generation.text, self.settings.result_inline_max_bytes
        )
        return Outcome(
            completion_tokens=len(generation.token_ids),
            finish_reason=generation.finish_reason,
            response_text=text,
            response_uri=uri,
            cost_input=cost.input,
            cost_output=cost.output,
            compute_seconds=generation.compute_seconds,
        )

    def renew(self) -> None:
        """Keep the claims of the batch we are running alive."""
        with self._lock:
            running = list(self._running)
        if running:
            with self.session_scope() as session:
                queries.renew_leases(session, running, self.settings.lease_seconds)

    def watch_claims(self) -> None:
        """Notice jobs of the running batch that were cancelled (or their batch was), so
        their rows stop decoding now rather than run to max_tokens for nobody."""
        with self._lock:
            running = list(self._running)
        if not running:
            return
        with self.session_scope() as session:
            lost = queries.lost_claims(session, running)
        with self._lock:
            if self._running and self._running[0] is running[0]:
                self._lost = frozenset(lost)

    def maintain(self) -> None:
        """Give back dead workers' jobs, start due jobs, publish what may be lost."""
        run_pass(self.session_scope, self.storage, self.queue, self.settings)

    def start_maintenance(self) -> list[threading.Thread]:
        """Lease renewal, the watch for cancelled jobs, and maintenance, each on its own
        timer, so that a long maintenance pass never lets our own leases lapse."""
        return [
            self._every(self.settings.lease_seconds / 3, self.renew, "mbatch-leases"),
            self._every(CLAIM_CHECK_SECONDS, self.watch_claims, "mbatch-claims"),
            self._every(
                self.settings.maintenance_interval_seconds, self.maintain, "mbatch-maintenance"
            ),
        ]

    def _every(self, interval: float, action: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(
            target=repeat, args=(interval, action, name, self._stop), name=name, daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
