"""What a worker process does with its one loaded model: from a message to claims, from
claims to decode groups, from groups to recorded results."""

import logging
import time
from collections.abc import Callable, Hashable

from jobs import batches, queries
from jobs.maintenance import enforce_max_cost
from jobs.models import Job
from jobs.queries import Claim
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage
from worker.adapters import Adapters
from worker.batch_choice import POLL_SECONDS, BatchChoice
from worker.claims import ClaimedRow, RunningClaims, prepare_rows
from worker.engine.batching import plan_groups
from worker.engine.decode import FAILED, Generation, NewRow, decode_rows, generate
from worker.engine.grammar import ERROR_CODE as GRAMMAR_ERROR
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
        self.worker_id = worker_id

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
        """Run claimed jobs; with refill, the batch goes on with the jobs it claims as its
        rows finish, until nothing is queued. Returns how many results it recorded."""
        claimed = list(claims)
        self.running.start(claimed)
        try:
            rows = prepare_rows(claims, self.loaded.tokenizer, self.results.fail)
            rows = self.adapters.load(rows)
            if self.settings.refill:
                recorded = _RefilledBatch(self, claimed).run(rows)
            else:
                groups = plan_groups(rows, lambda row: len(row.prompt), self.settings.max_padding)
                recorded = sum(self._run_group(group) for group in groups)
        finally:
            self.running.clear()
        self._finalize_batches(claimed)
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
                compile=self.settings.compile,
            )
        except Exception as exc:
            if len(group) > 1:
                # Not one row's settings (the engine fails those rows alone): out of memory,
                # say. Halves find out whether some rows run, without spending every batch
                # mate's attempts.
                log.exception("batch of %d failed; running it in halves", len(group))
                half = len(group) // 2
                return self._run_group(group[:half]) + self._run_group(group[half:])
            log.exception("job %s failed in the engine; giving it back", group[0].claim.job.id)
            self.results.give_back([row.claim for row in group], repr(exc))
            return 0
        decoded = time.perf_counter() - started
        recorded = sum(
            self.record(row, generation) for row, generation in zip(group, generations, strict=True)
        )
        log.info(
            "batch of %d: %d tokens decoded in %.2f s, recorded in %.2f s",
            len(group),
            sum(_tokens(g) for g in generations),
            decoded,
            time.perf_counter() - started - decoded,
        )
        return recorded

    def record(self, row: ClaimedRow, generation: Generation) -> bool:
        """Record a row's result; a row the engine could not set up fails alone."""
        if generation.finish_reason == FAILED:
            log.warning("job %s failed in the engine: %s", row.claim.job.id, generation.error)
            error = generation.error or "engine error"
            # A schema the grammar library cannot compile has its own code; any other row
            # that could not be set up is an invalid job.
            code = GRAMMAR_ERROR if error.startswith(f"{GRAMMAR_ERROR}:") else "invalid_job"
            self.results.fail([row.claim], code, error)
            return False
        return self.results.record(row, generation)


def _tokens(generation: Generation) -> int:
    """The tokens a row decoded, over all its samples."""
    return sum(len(sample.token_ids) for sample in generation.samples or [generation])


# How often a refilled batch looks at the file batches whose lines it ended (max_cost, done).
BATCH_CHECK_SECONDS = 0.5


class _RefilledBatch:
    """One batch whose free slots are refilled with jobs claimed as its rows finish.

    Refilled jobs are claimed as any batch's are (`claim_batch`: skip-locked, a lease, an
    attempt), the oldest queued ones first, with adapters that fit beside the running rows';
    they join the running claims, so their leases are renewed and their cancellations seen.
    Each row's result is recorded as soon as it finishes."""

    def __init__(self, runtime: WorkerRuntime, claimed: list[Claim]) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.claimed = claimed  # every claim of the batch, shared with run_claims
        self.rows: list[ClaimedRow] = []  # a row's key is its index here
        self.active: dict[int, ClaimedRow] = {}
        self.recorded = 0
        self.decoded = 0
        # When a claim last found less than it asked for, the queue is not asked again for a
        # moment, unless the batch has emptied (its end is decided by an empty queue).
        self.quiet_until = 0.0
        # Claims of file-batch lines ended since their batches were last looked at: a batch
        # that has spent its max_cost stops, and one whose last line ended is finalized, while
        # this batch goes on (it may run until the queue is empty).
        self.ended: list[Claim] = []
        self.batches_checked_at = 0.0

    def run(self, rows: list[ClaimedRow]) -> int:
        started = time.perf_counter()
        slots = self.settings.max_batch_size
        try:
            decode_rows(
                self.runtime.loaded,
                self._join(rows),
                self._finished,
                slots=slots,
                refill=self._refill,
                dropped=lambda: self.runtime.running.dropped(self.rows),
                compile=self.settings.compile,
            )
        except Exception:
            # Out of memory, or a claim that could not be made: the rows still running are
            # run again as static batches, which halve a batch that fails again.
            unfinished = list(self.active.values())
            log.exception("refilled batch failed; %d rows run again", len(unfinished))
            self.active.clear()
            groups = plan_groups(unfinished, lambda row: len(row.prompt), self.settings.max_padding)
            self.recorded += sum(self.runtime._run_group(group) for group in groups)
        log.info(
            "refilled batch of %d rows: %d tokens in %.2f s",
            len(self.rows),
            self.decoded,
            time.perf_counter() - started,
        )
        return self.recorded

    def _join(self, rows: list[ClaimedRow]) -> list[NewRow]:
        new = []
        for row in rows:
            key = len(self.rows)
            self.rows.append(row)
            self.active[key] = row
            new.append(NewRow(key, row.prompt, row.params, row.adapter))
        return new

    def _finished(self, key: Hashable, generation: Generation) -> None:
        assert isinstance(key, int)
        row = self.active.pop(key)
        self.decoded += _tokens(generation)
        self.recorded += self.runtime.record(row, generation)
        if row.claim.job.batch_id is not None:
            self.ended.append(row.claim)

    def _refill(self, free: int) -> list[NewRow]:
        if self.ended and time.monotonic() >= self.batches_checked_at + BATCH_CHECK_SECONDS:
            ended, self.ended = self.ended, []
            self.runtime._finalize_batches(ended)
            self.batches_checked_at = time.monotonic()
        emptied = free >= self.settings.max_batch_size
        if not emptied and time.monotonic() < self.quiet_until:
            return []
        running = {row.adapter for row in self.active.values() if row.adapter is not None}
        claims = self._claim(free, running)
        if len(claims) < free:
            self.quiet_until = time.monotonic() + POLL_SECONDS
        if not claims:
            return []
        self.claimed.extend(claims)
        self.runtime.running.start(self.claimed)
        runtime = self.runtime
        rows = prepare_rows(claims, runtime.loaded.tokenizer, runtime.results.fail)
        # The running rows' adapters are named too, so that none is evicted to make room.
        keep = [row for row in self.active.values() if row.adapter is not None]
        usable = runtime.adapters.load(rows + keep)
        claimed_now = {id(row) for row in rows}
        return self._join([row for row in usable if id(row) in claimed_now])

    def _claim(self, free: int, running_adapters: set[str]) -> list[Claim]:
        settings = self.settings
        room = settings.max_loras - len(running_adapters)

        def choose(candidates: list[Job]) -> list[Job]:
            chosen: list[Job] = []
            added: set[str] = set()
            slots = 0  # a job of n samples takes n slots
            for job in candidates:
                samples = int(job.sampling.get("n", 1))
                if chosen and slots + samples > free:
                    continue
                adapter = job.lora_id
                if adapter is not None and adapter not in running_adapters | added:
                    if len(added) >= room:
                        continue
                    added.add(adapter)
                chosen.append(job)
                slots += samples
                if slots >= free:
                    break
            return chosen

        with self.runtime.session_scope() as session:
            return queries.claim_batch(
                session,
                self.runtime.loaded.spec.name,
                self.runtime.worker_id,
                settings.lease_seconds,
                free * settings.claim_lookahead,
                choose=choose,
            )
