"""What a worker process does with its one loaded model: from a message to claims, from
claims to decode groups, from groups to recorded results."""

import logging
import time
from collections.abc import Callable

from jobs import batches, queries
from jobs.maintenance import enforce_max_cost
from jobs.queries import Claim
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage
from worker.adapters import Adapters
from worker.batch_choice import BatchChoice
from worker.claims import ClaimedRow, RunningClaims, prepare_rows
from worker.engine.batching import plan_groups
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel
from worker.results import Results
from worker.services import Services, SessionScope
from worker.timers import Timers

log = logging.getLogger(__name__)


class WorkerRuntime:
    """One loaded model's worker: the flow of a batch, with its parts each in a module."""

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
        services = Services(settings, session_scope, storage, queue)
        self.choice = BatchChoice(services, loaded.spec.name, worker_id)
        self.results = Results(services, loaded.spec)
        self.adapters = Adapters(loaded, services, self.results)
        self.running = RunningClaims()
        self.timers = Timers(services, self.running)

    def handle_message(self, job_id: str) -> int:
        """Run the batch that a message wakes us for; returns how many jobs it recorded.

        The message only says there is work: the batch is formed from what is queued for
        this model in Postgres, the message's own job first. A job already claimed or
        finished is skipped, which is what makes a repeated message harmless.
        """
        with self.session_scope() as session:
            mine = queries.is_queued(session, job_id)
            if not mine and not queries.count_queued(session, self.loaded.spec.name):
                return 0  # run by an earlier batch, and nothing else waits: nothing to do
        self.choice.wait_for_stragglers()
        # A message is published per batch's worth of a bulk submission, not per job, so
        # one whose job has gone still runs a batch of whatever is queued.
        claims = self.choice.claim(first_id=job_id if mine else None)
        return self.run_claims(claims) if claims else 0

    def drain(self, on_batch: Callable[[list[Claim]], None] | None = None) -> int:
        """Run batches until nothing is queued for this model (the one-process pipeline)."""
        done = 0
        while True:
            claims = self.choice.claim()
            if not claims:
                return done
            done += self.run_claims(claims)
            if on_batch is not None:
                on_batch(claims)

    def run_claims(self, claims: list[Claim]) -> int:
        self.running.start(claims)
        try:
            rows = prepare_rows(claims, self.loaded.tokenizer, self.results.fail)
            rows = self.adapters.load(rows)
            groups = plan_groups(rows, lambda row: len(row.prompt), self.settings.max_padding)
            recorded = sum(self._run_group(group) for group in groups)
        finally:
            self.running.clear()
        self._finalize_batches(claims)
        return recorded

    def _finalize_batches(self, claims: list[Claim]) -> None:
        """A file batch whose last lines just ran gets its output files now, not at the next
        maintenance pass; one that has spent its max_cost stops."""
        batch_ids = {c.job.batch_id for c in claims if c.job.batch_id is not None}
        try:
            with self.session_scope() as session:
                enforce_max_cost(session, batch_ids)
            batches.finalize_if_done(self.session_scope, self.storage, self.settings, batch_ids)
        except Exception:  # maintenance finalizes it later
            log.exception("could not finalize batches %s", sorted(batch_ids))

    def _run_group(self, group: list[ClaimedRow]) -> int:
        started = time.perf_counter()
        try:
            generations = generate(
                self.loaded,
                [row.prompt for row in group],
                [row.params for row in group],
                [row.adapter for row in group],
                dropped=lambda: self.running.dropped(group),
            )
        except Exception as exc:
            if len(group) > 1:
                # Out of memory, or one row the engine cannot take: halves find out which,
                # without spending every batch mate's attempts.
                log.exception("batch of %d failed; running it in halves", len(group))
                half = len(group) // 2
                return self._run_group(group[:half]) + self._run_group(group[half:])
            log.exception("job %s failed in the engine; giving it back", group[0].claim.job.id)
            self.results.give_back([row.claim for row in group], repr(exc))
            return 0
        decoded = time.perf_counter() - started
        recorded = sum(
            self.results.record(row, generation)
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
