"""Who gets a batch's slots: lanes in priority order, each keeping a minimum share of the
batch while it has work, and within a lane, owners taking turns by the tokens they were given.

The worker's choosers are greedy (`BatchChoice._choose` for a new batch, with its neighbours
by prompt length; `_RefilledBatch._claim` for freed slots): they take candidates in order, as
far as slots, the token budget and adapters allow. `Fairness.order` puts the candidates in the
order that makes them take the right ones, first those it plans the slots for:

1. each lane below its minimum share (`lane_min_share` of `max_batch_size`, counted with the
   rows already running), in lane order, up to that share;
2. then the lanes in order, as long as slots are left: interactive, native jobs, file-batch
   lines;
3. within a lane, the owner that was given the fewest tokens (a job's prompt tokens plus its
   samples' max_tokens) goes next, with its oldest job: a deficit round robin by tokens, so
   that one owner's 50,000-line batch does not starve another owner's 10 lines.

Native jobs and file-batch lines may be kept out of some slots (`bulk_room`): those a refilled
batch keeps for interactive jobs (`reserved_slots`), so that one finds a slot at once.

What each owner was given is kept per lane, in memory, one `Fairness` per worker (`record`,
after a claim). An owner that comes back, or comes for the first time, starts level with the
least served of the owners then waiting in its lane, not from zero: no owner banks tokens
while away to take a lane over when it returns. Pure: no database, no clock.
"""

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from jobs.models import Job, Lane
from jobs.queries import LANES, OwnerRotation
from jobs.settings import Settings

# The lanes a refill asks when only the slots kept for interactive jobs are free.
INTERACTIVE: tuple[int, ...] = (Lane.interactive.value,)
# Owners whose count is kept per lane, beyond those level with the least served (who need no
# entry); past it, the least served are forgotten (they come back level with the others).
MAX_OWNERS_KEPT = 4096


def samples(job: Job) -> int:
    """The slots a job takes: one per sample."""
    return int(job.sampling.get("n", 1))


def tokens(job: Job) -> int:
    """What a job costs its owner's turn: its prompt, and the most its samples may decode."""
    return int(job.prompt_tokens) + samples(job) * int(job.sampling.get("max_tokens", 0))


def is_bulk(job: Job) -> bool:
    """Native jobs and file-batch lines: kept out of the slots reserved for interactive jobs."""
    return job.lane != Lane.interactive


def min_slots(share: float, batch_size: int) -> int:
    """A lane's minimum share of a batch, in slots (rounded up: a share above 0 is a slot)."""
    return math.ceil(round(share * batch_size, 9))


def reserved_slots(interactive_slots: int, batch_size: int) -> int:
    """The slots of a refilled batch that bulk lanes never fill: `interactive_slots`, but no
    more than half the batch, so that bulk work always keeps most of it."""
    return min(interactive_slots, batch_size // 2)


@dataclass(frozen=True)
class Order:
    """Candidates in the order a greedy chooser should take them."""

    # Those the lanes' shares and the owners' turns give the slots to, in that order.
    planned: list[Job]
    # The others, in the same order of preference: for the room that the planned ones leave
    # (a job over the token budget, an adapter that does not fit).
    rest: list[Job]

    @property
    def all(self) -> list[Job]:
        return self.planned + self.rest


class Fairness:
    """One worker's memory of the tokens each owner was given per lane, and where its next
    look at each lane's owners starts (`rotation`, for `queries.claim_batch`)."""

    def __init__(self, lane_min_share: float, batch_size: int, owners_per_lane: int = 16) -> None:
        self.min_slots = min_slots(lane_min_share, batch_size)
        self.rotation = OwnerRotation(owners_per_lane)
        self._given: dict[int, dict[str, int]] = {lane: {} for lane in LANES}
        # Per lane, what the least served owner waiting there was given: the level that an
        # owner coming (back) starts from.
        self._level: dict[int, int] = dict.fromkeys(LANES, 0)
        # Per lane, the owners seen waiting by the last `order`.
        self._waiting: dict[int, set[str]] = {lane: set() for lane in LANES}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Fairness":
        return cls(settings.lane_min_share, settings.max_batch_size, settings.claim_owners)

    def given(self, lane: int, owner: str) -> int:
        """The tokens `owner` counts as given in `lane`."""
        return max(self._given[lane].get(owner, 0), self._level[lane])

    def order(
        self,
        candidates: Sequence[Job],
        slots: int,
        running: Mapping[int, int] | None = None,
        bulk_room: int | None = None,
        first: Job | None = None,
    ) -> Order:
        """`candidates` (oldest first within each owner and lane) in the order to take them,
        for `slots` free slots of a batch where `running` (slots by lane) are taken already.
        Bulk lanes get no more than `bulk_room` of the slots. `first`, a job already in the
        batch (the message's own), counts as given to its owner."""
        queues: dict[int, dict[str, deque[Job]]] = {lane: {} for lane in LANES}
        # Each candidate's place by age (those not stored yet, which have none, last).
        by_age = sorted(
            range(len(candidates)),
            key=lambda i: (candidates[i].created_at is None, candidates[i].created_at or 0, i),
        )
        age = {id(candidates[i]): place for place, i in enumerate(by_age)}
        for job in candidates:
            queues[job.lane].setdefault(job.owner, deque()).append(job)
        for lane, owners in queues.items():
            if owners:
                self._waiting[lane] = set(owners)
        turns = {
            lane: {owner: self.given(lane, owner) for owner in owners}
            for lane, owners in queues.items()
        }
        if first is not None:
            turn = turns[first.lane]
            turn[first.owner] = turn.get(first.owner, self.given(first.lane, first.owner))
            turn[first.owner] += tokens(first)
        in_batch = Counter(running or {})
        left = slots
        bulk_left = slots if bulk_room is None else bulk_room

        def fits(job: Job) -> bool:
            need = samples(job)
            return need <= left and (not is_bulk(job) or need <= bulk_left)

        def next_job(lane: int, check: bool = True) -> Job | None:
            """The oldest job of the lane's least served owner (among those whose oldest
            fits, when `check`), counted as given to it."""
            waiting = [
                owner
                for owner, jobs in queues[lane].items()
                if jobs and (not check or fits(jobs[0]))
            ]
            if not waiting:
                return None
            # Between owners given as much, the one whose oldest job is older goes first.
            owner = min(
                waiting, key=lambda name: (turns[lane][name], age[id(queues[lane][name][0])])
            )
            job = queues[lane][owner].popleft()
            turns[lane][owner] += tokens(job)
            return job

        planned: list[Job] = []

        def plan(lane: int, wanted: float) -> None:
            nonlocal left, bulk_left
            while in_batch[lane] < wanted and (job := next_job(lane)) is not None:
                planned.append(job)
                need = samples(job)
                left -= need
                bulk_left -= need if is_bulk(job) else 0
                in_batch[lane] += need

        for lane in LANES:  # the shares first, then priority
            plan(lane, self.min_slots)
        for lane in LANES:
            plan(lane, math.inf)
        rest: list[Job] = []
        for lane in LANES:
            while (leftover := next_job(lane, check=False)) is not None:
                rest.append(leftover)
        return Order(planned, rest)

    def record(self, jobs: Iterable[Job]) -> None:
        """Count the jobs just claimed as given to their owners."""
        lanes: set[int] = set()
        for job in jobs:
            self._given[job.lane][job.owner] = self.given(job.lane, job.owner) + tokens(job)
            lanes.add(job.lane)
        for lane in lanes:
            waiting = self._waiting[lane]
            if waiting:
                least = min(self.given(lane, owner) for owner in waiting)
                self._level[lane] = max(self._level[lane], least)
            level = self._level[lane]
            kept = {owner: n for owner, n in self._given[lane].items() if n > level}
            if len(kept) > MAX_OWNERS_KEPT:
                kept = dict(sorted(kept.items(), key=lambda item: item[1])[-MAX_OWNERS_KEPT:])
            self._given[lane] = kept
