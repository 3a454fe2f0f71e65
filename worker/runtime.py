"""What a worker process does with its one loaded model: claim, decode, record, maintain."""

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from jobs import queries
from jobs.maintenance import maintain
from jobs.pricing import price
from jobs.queries import Claim, Outcome
from jobs.queue import JobQueue
from jobs.sampling import SamplingParams
from jobs.service import publish
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.tokenizer import encode_job_input
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel

log = logging.getLogger(__name__)

SessionScope = Callable[[], AbstractContextManager[Session]]


def result_key(job_id: str) -> str:
    return f"results/{job_id}.txt"


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
        self._running: list[Claim] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def model_name(self) -> str:
        return self.loaded.spec.name

    def handle_message(self, job_id: str) -> int:
        """Run the batch that a message wakes us for; returns how many jobs it recorded.

        The message only says there is work: the batch is whatever is queued for this model
        in Postgres, the message's own job first. A job already claimed or finished is
        skipped, which is what makes a repeated message harmless.
        """
        claims = self._claim(first_id=job_id)
        return self.run_claims(claims) if claims else 0

    def _claim(self, first_id: str | None = None) -> list[Claim]:
        with self.session_scope() as session:
            return queries.claim_batch(
                session,
                self.model_name,
                self.worker_id,
                self.settings.lease_seconds,
                self.settings.max_batch_size,
                first_id=first_id,
            )

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

    def run_claims(self, claims: list[Claim]) -> int:
        with self._lock:
            self._running = list(claims)
        try:
            return self._run(claims)
        finally:
            with self._lock:
                self._running = []

    def _run(self, claims: list[Claim]) -> int:
        tokenizer = self.loaded.tokenizer
        ready: list[tuple[Claim, list[int], SamplingParams]] = []
        recorded = 0
        for claim in claims:
            try:
                ids = encode_job_input(tokenizer, claim.job.input)
                params = SamplingParams.from_dict(claim.job.sampling)
            except Exception as exc:  # a bad stored job fails alone; its batch mates run
                with self.session_scope() as session:
                    queries.record_failure(session, claim, "invalid_job", str(exc))
                continue
            ready.append((claim, ids, params))
        if not ready:
            return 0
        try:
            generations = generate(
                self.loaded, [ids for _, ids, _ in ready], [p for _, _, p in ready]
            )
        except Exception as exc:
            log.exception("batch of %d failed; giving its jobs back", len(ready))
            with self.session_scope() as session:
                requeued = queries.release_claims(
                    session, [c for c, _, _ in ready], self.settings.max_attempts, repr(exc)
                )
                publish(session, self.queue, requeued)
            return 0
        for (claim, ids, _), generation in zip(ready, generations, strict=True):
            cost = price(self.loaded.spec, len(ids), len(generation.token_ids))
            text, uri = generation.text, None
            if len(text.encode()) > self.settings.result_inline_max_bytes:
                uri = result_key(claim.job.id)
                self.storage.put_bytes(uri, text.encode())
                text = None  # type: ignore[assignment]
            outcome = Outcome(
                completion_tokens=len(generation.token_ids),
                finish_reason=generation.finish_reason,
                response_text=text,
                response_uri=uri,
                cost_input=cost.input,
                cost_output=cost.output,
            )
            with self.session_scope() as session:
                if queries.record_success(session, claim, outcome):
                    recorded += 1
                else:
                    log.info("job %s was cancelled or reclaimed; result dropped", claim.job.id)
        return recorded

    def maintain(self) -> None:
        """Keep our claims alive, give back dead workers' jobs, publish what may be lost."""
        with self._lock:
            running = list(self._running)
        with self.session_scope() as session:
            if running:
                queries.renew_leases(session, running, self.settings.lease_seconds)
            maintain(session, self.queue, self.settings)

    def start_maintenance(self) -> threading.Thread:
        interval = min(self.settings.maintenance_interval_seconds, self.settings.lease_seconds / 3)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.maintain()
                except Exception:
                    log.exception("maintenance pass failed; trying again")
                self._stop.wait(interval)

        thread = threading.Thread(target=loop, name="mbatch-maintenance", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
