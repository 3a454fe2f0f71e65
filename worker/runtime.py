"""What a worker process does with its one loaded model: from a message to claims, from
claims to decode groups, from groups to recorded results."""

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

from jobs import batches, queries
from jobs.maintenance import enforce_max_cost
from jobs.models import Job
from jobs.queries import Claim
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage
from worker import fairness
from worker.adapters import Adapters
from worker.batch_choice import POLL_SECONDS, BatchChoice
from worker.claims import ClaimedRow, RunningClaims, prepare_rows
from worker.engine.batching import plan_groups
from worker.engine.decode import FAILED, Generation, NewRow, decode_rows, generate
from worker.engine.grammar import ERROR_CODE as GRAMMAR_ERROR
from worker.engine.loader import LoadedModel
from worker.results import Results
from worker.services import Services, SessionScope
from worker.streaming import StreamPublisher
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
        self.streams = StreamPublisher.for_broker(settings.broker_url, settings.stream_ttl_seconds)

    def handle_message(self, job_id: str) -> int:
        """Run the batch that a message wakes us for; returns how many jobs it recorded.

        The message only says there is work: the batch is formed from what is queued for
        this model in Postgres, the message's own job first. A job already claimed or
        finished is skipped, which is what makes a repeated message harmless.
        """
        with self.session_scope() as session:
            lane = queries.queued_lane(session, job_id)
            mine = lane is not None
            if not mine and not queries.count_queued(session, self.loaded.spec.name):
                return 0  # run by an earlier batch, and nothing else waits: nothing to do
        if lane not in fairness.INTERACTIVE:
            # An interactive job's caller is waiting for it: it runs at once, with whatever
            # else is queued then, not after a wait for stragglers.
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
        try:
            return self._decode_group(group)
        finally:  # rows given back, or left unrecorded by an error, are streamed no more
            self.streams.forget(row.claim.job.id for row in group)

    def _decode_group(self, group: list[ClaimedRow]) -> int:
        started = time.perf_counter()
        self.start_streams(group)
        try:
            generations = generate(
                self.loaded,
                [row.prompt for row in group],
                [row.params for row in group],
                [row.adapter for row in group],
                dropped=lambda: self.running.dropped(group),
                compile=self.settings.compile,
                streams=[bool(row.claim.job.stream) for row in group],
                on_tokens=lambda rows: self.stream_step(group, rows),
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
        self.streams.step([])  # the endings just recorded
        log.info(
            "batch of %d: %d tokens decoded in %.2f s, recorded in %.2f s",
            len(group),
            sum(_tokens(g) for g in generations),
            decoded,
            time.perf_counter() - started - decoded,
        )
        return recorded

    def record(self, row: ClaimedRow, generation: Generation) -> bool:
        """Record a row's result; a row the engine could not set up fails alone. A caller
        waiting on the job's stream is told that it ended (with the next step's events)."""
        try:
            if generation.finish_reason == FAILED:
                log.warning("job %s failed in the engine: %s", row.claim.job.id, generation.error)
                error = generation.error or "engine error"
                # A schema the grammar library cannot compile has its own code; any other row
                # that could not be set up is an invalid job.
                code = GRAMMAR_ERROR if error.startswith(f"{GRAMMAR_ERROR}:") else "invalid_job"
                self.results.fail([row.claim], code, error)
                return False
            return self.results.record(row, generation)
        finally:
            self.streams.ended(row.claim.job)

    def start_streams(self, rows: Iterable[ClaimedRow]) -> None:
        """Follow the text of the rows that stream, from their first token."""
        decode = self.loaded.tokenizer.decode
        for row in rows:
            self.streams.start(row.claim.job, decode, row.params.stop)

    def stream_step(
        self, rows: Sequence[ClaimedRow], streaming: list[tuple[Hashable, Sequence[int]]]
    ) -> None:
        """After a step: the streaming rows' new text and the endings since, to Redis."""
        # A row's key is its index in `rows` (a static group's, or a refilled batch's).
        self.streams.step((rows[int(key)].claim.job.id, tokens) for key, tokens in streaming)  # type: ignore[call-overload]


def _tokens(generation: Generation) -> int:
    """The tokens a row decoded, over all its samples."""
    return sum(len(sample.token_ids) for sample in generation.samples or [generation])


# How often a refilled batch looks at the file batches whose lines it ended (max_cost, done).
BATCH_CHECK_SECONDS = 0.5


class _Recorder:
    """Records finished rows on a thread of its own, in the order they finished."""

    def __init__(self, record: Callable[[ClaimedRow, Generation], None]) -> None:
        self._record = record
        self._queue: queue.SimpleQueue[tuple[ClaimedRow, Generation] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mbatch-recorder", daemon=True)
        self._thread.start()

    def put(self, row: ClaimedRow, generation: Generation) -> None:
        self._queue.put((row, generation))

    def close(self) -> None:
        """Wait until every row put is recorded."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._record(*item)
            except Exception:  # its lease lapses, and maintenance gives the job back
                log.exception("could not record job %s", item[0].claim.job.id)


class _RefilledBatch:
    """One batch whose free slots are refilled with jobs claimed as its rows finish.

    Refilled jobs are claimed as any batch's are (`claim_batch`: skip-locked, a lease, an
    attempt), in the lanes' and owners' turns (`worker.fairness`), with adapters that fit
    beside the running rows';
    they join the running claims, so their leases are renewed and their cancellations seen.
    Each row's result is recorded as soon as it finishes: on Postgres by a thread of its own
    (`_Recorder`), so that the decode loop never waits for a commit (rows that end together,
    as a batch's lines of one max_tokens do, would otherwise stall every step, and every
    interactive job that waits for a slot, for as many commits)."""

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
        # The recorder thread adds to `recorded` and `ended`.
        self.lock = threading.Lock()
        # SQLite (the embedded default) takes one writer at a time: its rows are recorded in
        # the decode loop.
        postgres = self.settings.database_url.startswith("postgresql")
        self.recorder = _Recorder(self._record) if postgres else None

    def run(self, rows: list[ClaimedRow]) -> int:
        started = time.perf_counter()
        try:
            self._decode(rows)
        finally:
            if self.recorder is not None:
                self.recorder.close()  # every finished row recorded before the batch ends
                self.runtime.streams.step([])  # the endings recorded after the last step
        log.info(
            "refilled batch of %d rows: %d tokens in %.2f s",
            len(self.rows),
            self.decoded,
            time.perf_counter() - started,
        )
        return self.recorded

    def _decode(self, rows: list[ClaimedRow]) -> None:
        slots = self.settings.max_batch_size
        try:
            decode_rows(
                self.runtime.loaded,
                self._join(rows),
                self._finished,
                slots=slots,
                refill=self._refill,
                dropped=lambda: self.runtime.running.dropped_keys(self.active),
                compile=self.settings.compile,
                on_tokens=lambda streaming: self.runtime.stream_step(self.rows, streaming),
                prefill_tokens=self.settings.prefill_chunk_tokens,
            )
        except Exception:
            # Out of memory, or a claim that could not be made: the rows still running are
            # run again as static batches, which halve a batch that fails again.
            unfinished = list(self.active.values())
            log.exception("refilled batch failed; %d rows run again", len(unfinished))
            self.active.clear()
            groups = plan_groups(unfinished, lambda row: len(row.prompt), self.settings.max_padding)
            recorded = sum(self.runtime._run_group(group) for group in groups)
            with self.lock:
                self.recorded += recorded

    def _join(self, rows: list[ClaimedRow]) -> list[NewRow]:
        new = []
        self.runtime.start_streams(rows)
        for row in rows:
            key = len(self.rows)
            self.rows.append(row)
            self.active[key] = row
            stream = bool(row.claim.job.stream)
            new.append(NewRow(key, row.prompt, row.params, row.adapter, stream))
        return new

    def _finished(self, key: Hashable, generation: Generation) -> None:
        assert isinstance(key, int)
        row = self.active.pop(key)
        self.decoded += _tokens(generation)
        if self.recorder is not None:
            self.recorder.put(row, generation)
        else:
            self._record(row, generation)

    def _record(self, row: ClaimedRow, generation: Generation) -> None:
        recorded = self.runtime.record(row, generation)
        with self.lock:
            self.recorded += recorded
            if row.claim.job.batch_id is not None:
                self.ended.append(row.claim)

    def _refill(self, free: int) -> list[NewRow]:
        if self.ended and time.monotonic() >= self.batches_checked_at + BATCH_CHECK_SECONDS:
            with self.lock:
                ended, self.ended = self.ended, []
            self.runtime._finalize_batches(ended)
            self.batches_checked_at = time.monotonic()
        size = self.settings.max_batch_size
        emptied = free >= size
        running = {row.adapter for row in self.active.values() if row.adapter is not None}
        lanes: Counter[int] = Counter()  # the slots each lane's running rows take
        for row in self.active.values():
            lanes[row.claim.job.lane] += fairness.samples(row.claim.job)
        bulk = sum(lanes.values()) - sum(lanes[lane] for lane in fairness.INTERACTIVE)
        # Native jobs and file-batch lines never fill the slots kept for interactive jobs.
        bulk_room = min(free, size - self.runtime.choice.reserved - bulk)
        if bulk_room <= 0 or (not emptied and time.monotonic() < self.quiet_until):
            # Only those slots are free, or bulk work fell short a moment ago: the interactive
            # lane alone is asked, by one probe of its index (every few steps at most), and
            # claimed from only when it has work.
            if not self.runtime.choice.interactive_waiting():
                return []
            claims = self._claim(free, running, fairness.INTERACTIVE, lanes, 0)
        else:
            claims = self._claim(free, running, fairness.LANES, lanes, bulk_room)
            if sum(fairness.samples(claim.job) for claim in claims) < bulk_room:
                self.quiet_until = time.monotonic() + POLL_SECONDS
        if not claims:
            return []
        self.claimed.extend(claims)
        # The claims still decoding, not every claim of a batch that may run for hours: the
        # timers renew and watch these each second, and their cost stays that of one batch.
        self.runtime.running.start([row.claim for row in self.active.values()] + claims)
        runtime = self.runtime
        rows = prepare_rows(claims, runtime.loaded.tokenizer, runtime.results.fail)
        # The running rows' adapters are named too, so that none is evicted to make room.
        keep = [row for row in self.active.values() if row.adapter is not None]
        usable = runtime.adapters.load(rows + keep)
        claimed_now = {id(row) for row in rows}
        return self._join([row for row in usable if id(row) in claimed_now])

    def _claim(
        self,
        free: int,
        running_adapters: set[str],
        lanes: Sequence[int] = fairness.LANES,
        running: Mapping[int, int] | None = None,
        bulk_room: int | None = None,
    ) -> list[Claim]:
        """Claim jobs of `lanes` for `free` slots, no more than `bulk_room` of them for bulk
        lanes, beside rows taking `running` slots by lane: in the lanes' and owners' turns
        (`fairness.Fairness.order`), as far as slots and adapters allow."""
        settings = self.settings
        room = settings.max_loras - len(running_adapters)
        turns = self.runtime.choice.fairness
        bulk_room = free if bulk_room is None else bulk_room

        def choose(candidates: list[Job]) -> list[Job]:
            order = turns.order(candidates, free, running=running, bulk_room=bulk_room)
            chosen: list[Job] = []
            added: set[str] = set()
            slots = bulk = 0  # a job of n samples takes n slots
            for job in order.all:
                samples = fairness.samples(job)
                is_bulk = fairness.is_bulk(job)
                # The first always goes (one of n samples waits for n free slots).
                if chosen and (slots + samples > free or (is_bulk and bulk + samples > bulk_room)):
                    continue
                adapter = job.lora_id
                if adapter is not None and adapter not in running_adapters | added:
                    if len(added) >= room:
                        continue
                    added.add(adapter)
                chosen.append(job)
                slots += samples
                bulk += samples if is_bulk else 0
                if slots >= free:
                    break
            return chosen

        with self.runtime.session_scope() as session:
            claims = queries.claim_batch(
                session,
                self.runtime.loaded.spec.name,
                self.runtime.worker_id,
                settings.lease_seconds,
                free * settings.claim_lookahead,
                choose=choose,
                lanes=lanes,
                lane_min=turns.min_slots,
                rotation=turns.rotation,
            )
        turns.record(claim.job for claim in claims)
        return claims
