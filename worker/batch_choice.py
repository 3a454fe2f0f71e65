"""Which queued jobs a worker runs next: a bounded wait for stragglers, then a batch chosen
and claimed."""

import time

from jobs import queries
from jobs.models import Job
from jobs.queries import Claim
from worker.engine.batching import select_batch
from worker.services import Services

# The straggler wait looks at the queue no more often than this.
POLL_SECONDS = 0.1


class BatchChoice:
    """Forms batches from what is queued for one model, and claims them for one worker."""

    def __init__(self, services: Services, model_name: str, worker_id: str) -> None:
        self.settings = services.settings
        self.session_scope = services.session_scope
        self.model_name = model_name
        self.worker_id = worker_id

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

    def claim(self, first_id: str | None = None) -> list[Claim]:
        """Claim a batch from a window of the queue, job `first_id` first when it waits."""
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
