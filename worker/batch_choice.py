"""Which queued jobs a worker runs next: a bounded wait for stragglers, then a batch chosen
and claimed."""

import time
from collections import Counter

from jobs import queries
from jobs.models import Job
from jobs.queries import Claim
from worker.engine.batching import select_batch
from worker.fairness import INTERACTIVE, Fairness, Order, is_bulk, reserved_slots, samples
from worker.services import Services
from worker.streaming import InteractiveSignal, broker_client

# The straggler wait looks at the queue no more often than this.
POLL_SECONDS = 0.1
# A refilled batch whose free slots only interactive jobs may take looks at the interactive
# lane when the API's signal says one was queued (`jobs.streams.interactive_key`), and
# otherwise every INTERACTIVE_CHECK_SECONDS, for a job whose signal was lost. While Redis
# cannot say, it looks every INTERACTIVE_POLL_SECONDS: one indexed probe (under a millisecond)
# per look, a few percent of the decode at most, and a wait of a few steps at most.
INTERACTIVE_POLL_SECONDS = 0.05
INTERACTIVE_CHECK_SECONDS = 0.5


class BatchChoice:
    """Forms batches from what is queued for one model, and claims them for one worker."""

    def __init__(self, services: Services, model_name: str, worker_id: str) -> None:
        self.settings = services.settings
        self.session_scope = services.session_scope
        self.model_name = model_name
        self.worker_id = worker_id
        # The lanes' and owners' turns, kept across this worker's batches.
        self.fairness = Fairness.from_settings(self.settings)
        # Slots of a refilled batch that bulk lanes never fill, so that an interactive job
        # finds one free at once; a batch run to its end takes interactive jobs first at the
        # next claim instead.
        size = self.settings.max_batch_size
        refill = self.settings.refill
        self.reserved = reserved_slots(self.settings.interactive_slots, size) if refill else 0
        self.interactive_looked_at = -INTERACTIVE_POLL_SECONDS
        self.signal = InteractiveSignal(broker_client(self.settings.broker_url), model_name)

    def wait_for_stragglers(self) -> None:
        """Give a batch that is not full a bounded moment to fill: until it is full, until
        jobs stop arriving, or until batch_wait_ms have passed.

        The queue is looked at every batch_quiet_ms / 2, but no more often than every
        POLL_SECONDS, and each look counts no further than a full batch: the wait costs a
        few bounded queries, whatever the queue's length. A quiet spell is told from two
        looks with the same count, so the wait may outlast batch_quiet_ms by one interval."""
        started = time.monotonic()
        deadline = started + self.settings.batch_wait_ms / 1000
        quiet = self.settings.batch_quiet_ms / 1000
        interval = max(POLL_SECONDS, quiet / 2)
        full = self.settings.max_batch_size
        last_count, last_change = -1, started
        while (now := time.monotonic()) < deadline:
            with self.session_scope() as session:
                count = queries.count_queued(session, self.model_name, at_most=full)
            if count >= full:
                return
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= quiet:
                return
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))

    def interactive_waiting(self) -> bool:
        """Whether an interactive job is queued: one probe of the lane's index, whatever
        else is queued. Asked every step of a batch whose bulk slots are full, it probes when
        the API's signal says an interactive job was queued since the last look (one small
        Redis read), and otherwise no more often than every INTERACTIVE_CHECK_SECONDS (a job
        whose signal was lost), or every INTERACTIVE_POLL_SECONDS while Redis cannot say."""
        now = time.monotonic()
        moved = self.signal.moved()
        since = now - self.interactive_looked_at
        wait = INTERACTIVE_POLL_SECONDS if moved is None else INTERACTIVE_CHECK_SECONDS
        if not moved and since < wait:
            return False
        self.interactive_looked_at = now
        with self.session_scope() as session:
            return bool(queries.count_queued(session, self.model_name, lanes=INTERACTIVE))

    def claim(self, first_id: str | None = None) -> list[Claim]:
        """Claim a batch from a window of the queue, job `first_id` first when it waits: the
        window holds each lane's owners' oldest jobs (`queries.queued_candidates`), and the
        batch is chosen among them by lane, owner and prompt length (`_choose`)."""
        settings = self.settings
        with self.session_scope() as session:
            claims = queries.claim_batch(
                session,
                self.model_name,
                self.worker_id,
                settings.lease_seconds,
                settings.max_batch_size * settings.claim_lookahead,
                first_id=first_id,
                choose=lambda candidates: self._choose(candidates, first_id),
                lane_min=self.fairness.min_slots * settings.claim_lookahead,
                rotation=self.fairness.rotation,
            )
        self.fairness.record(claim.job for claim in claims)
        return claims

    def _choose(self, candidates: list[Job], first_id: str | None = None) -> list[Job]:
        """The message's job (else the first that the lanes' and owners' turns give a slot
        to), and its neighbours: those the turns give the batch's other slots to, nearest to
        it in prompt length within each owner's share, then the rest by lane; bulk lanes
        never in the slots kept for interactive jobs."""
        if not candidates:
            return []
        size = self.settings.max_batch_size
        bulk_limit = size - self.reserved
        if first_id is not None and candidates[0].id == first_id:
            first = candidates[0]
            taken = samples(first)
            order = self.fairness.order(
                candidates[1:],
                size - taken,
                running={first.lane: taken},
                bulk_room=bulk_limit - (taken if is_bulk(first) else 0),
                first=first,
            )
        else:
            order = self.fairness.order(candidates, size, bulk_room=bulk_limit)
            first = order.all[0]
        tiers = _tiers(first, order)
        return select_batch(
            [first, *(job for job in order.all if job is not first)],
            prompt_tokens=lambda job: job.prompt_tokens,
            max_tokens=lambda job: int(job.sampling["max_tokens"]),
            max_batch_size=size,
            max_batch_tokens=self.settings.max_batch_tokens,
            adapter=lambda job: job.lora_id,
            max_adapters=self.settings.max_loras,
            tier=lambda job: tiers[job.id],
            bulk=is_bulk,
            max_bulk=bulk_limit,
        )


def _tiers(first: Job, order: Order) -> dict[str, int]:
    """Each candidate's tier for `select_batch`: 0 for as many of each owner's jobs as the
    turns planned for it (those nearest to `first` in prompt length, so that its batch pads
    little), then 1 + lane for the others."""
    quota = Counter((job.lane, job.owner) for job in order.planned if job is not first)
    owners: dict[tuple[int, str], list[Job]] = {}
    for job in order.all:
        if job is not first:
            owners.setdefault((job.lane, job.owner), []).append(job)
    tiers = {first.id: 0}
    for key, jobs in owners.items():
        nearest = sorted(jobs, key=lambda job: abs(job.prompt_tokens - first.prompt_tokens))
        planned = {job.id for job in nearest[: quota[key]]}
        for job in jobs:
            tiers[job.id] = 0 if job.id in planned else 1 + job.lane
    return tiers
