"""Who gets a batch's slots (`worker.fairness`), and how the static batch's chooser follows it
(`BatchChoice._choose`, `select_batch`): lanes in order, each lane's minimum share, owners'
turns by tokens, the slots kept for interactive jobs."""

import itertools
from collections import Counter
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session

from jobs.models import Job, Lane
from jobs.queue import InProcessQueue
from jobs.settings import Settings, error_lines
from worker.batch_choice import BatchChoice
from worker.engine.batching import select_batch
from worker.fairness import Fairness, min_slots, reserved_slots, tokens
from worker.services import Services

INTERACTIVE, NATIVE, FILE = Lane.interactive.value, Lane.native.value, Lane.file_batch.value
_ids = itertools.count()


def job(owner: str, lane: int, prompt: int = 10, max_tokens: int = 10, n: int = 1) -> Job:
    """A queued job as a claim reads it (not stored: the choice is pure)."""
    number = next(_ids)
    return Job(
        id=f"job_{number:06d}",
        owner=owner,
        lane=lane,
        prompt_tokens=prompt,
        sampling={"max_tokens": max_tokens, "n": n},
        lora_id=None,
    )


def jobs(owner: str, lane: int, count: int, **kwargs: Any) -> list[Job]:
    return [job(owner, lane, **kwargs) for _ in range(count)]


def lanes_of(chosen: Iterable[Job]) -> Counter[int]:
    return Counter(j.lane for j in chosen)


def owners_of(chosen: Iterable[Job]) -> list[str]:
    return [j.owner for j in chosen]


def test_shares_and_reserve_in_slots() -> None:
    assert min_slots(0.1, 32) == 4 and min_slots(0.25, 8) == 2 and min_slots(0.0, 32) == 0
    assert min_slots(1.0, 32) == 32 and min_slots(0.1, 10) == 1
    assert reserved_slots(2, 32) == 2 and reserved_slots(2, 2) == 1 and reserved_slots(2, 1) == 0
    assert tokens(job("a", NATIVE, prompt=7, max_tokens=5, n=3)) == 22


def test_the_settings_and_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MBATCH_LANE_MIN_SHARE", "MBATCH_INTERACTIVE_SLOTS", "MBATCH_CLAIM_OWNERS"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (defaults.lane_min_share, defaults.interactive_slots, defaults.claim_owners) == (
        0.1,
        2,
        16,
    )
    monkeypatch.setenv("MBATCH_LANE_MIN_SHARE", "1.5")
    monkeypatch.setenv("MBATCH_INTERACTIVE_SLOTS", "-1")
    monkeypatch.setenv("MBATCH_CLAIM_OWNERS", "0")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert error_lines(caught.value) == [
        "MBATCH_LANE_MIN_SHARE=1.5: must be at most 1",
        "MBATCH_INTERACTIVE_SLOTS=-1: must be at least 0",
        "MBATCH_CLAIM_OWNERS=0: must be at least 1",
    ]


def test_lanes_fill_in_order_interactive_native_file() -> None:
    fairness = Fairness(lane_min_share=0.0, batch_size=6)
    queue = jobs("a", FILE, 4) + jobs("a", NATIVE, 4) + jobs("a", INTERACTIVE, 3)
    order = fairness.order(queue, slots=6)
    assert [j.lane for j in order.planned] == [INTERACTIVE] * 3 + [NATIVE] * 3
    # What is not planned follows in the same preference: native, then file lines.
    assert [j.lane for j in order.rest] == [NATIVE] + [FILE] * 4
    # Oldest first within an owner and lane.
    assert order.planned[3:] == queue[4:7]


def test_each_lane_with_work_keeps_its_minimum_share() -> None:
    fairness = Fairness(lane_min_share=0.25, batch_size=8)  # 2 slots a lane
    queue = jobs("a", FILE, 20) + jobs("a", NATIVE, 20) + jobs("a", INTERACTIVE, 20)
    planned = fairness.order(queue, slots=8).planned
    assert lanes_of(planned) == {INTERACTIVE: 4, NATIVE: 2, FILE: 2}
    # The share counts the rows already running: a lane that has its share gets no more.
    planned = fairness.order(queue, slots=2, running={NATIVE: 2, FILE: 3}).planned
    assert lanes_of(planned) == {INTERACTIVE: 2}
    planned = fairness.order(queue, slots=2, running={INTERACTIVE: 5, NATIVE: 2}).planned
    assert lanes_of(planned) == {FILE: 2}
    # Lanes short of their share are made up in lane order.
    planned = fairness.order(queue, slots=3, running={INTERACTIVE: 5, FILE: 1}).planned
    assert [j.lane for j in planned] == [NATIVE, NATIVE, FILE]
    # A lane without work leaves its share to the others.
    planned = fairness.order(jobs("a", FILE, 20), slots=8).planned
    assert lanes_of(planned) == {FILE: 8}


def test_owners_take_turns_so_a_big_batch_does_not_starve_a_small_one() -> None:
    fairness = Fairness(lane_min_share=0.0, batch_size=8)
    big = jobs("alice", FILE, 500)
    small = jobs("bob", FILE, 5)
    queue = big + small  # alice's 500 lines were queued first
    first = fairness.order(queue, slots=8).planned
    assert owners_of(first).count("bob") == 4
    fairness.record(first)
    left = [j for j in queue if j not in first]
    second = fairness.order(left, slots=8).planned
    assert owners_of(second).count("bob") == 1  # all of bob's lines in the first two claims
    assert set(small) <= set(first + second)


def test_turns_are_weighted_by_tokens() -> None:
    fairness = Fairness(lane_min_share=0.0, batch_size=32)
    # alice's jobs cost 20 tokens each, bob's 200: bob gets a tenth as many slots.
    queue = jobs("alice", NATIVE, 40, prompt=10, max_tokens=10)
    queue += jobs("bob", NATIVE, 40, prompt=100, max_tokens=100)
    planned = fairness.order(queue, slots=22).planned
    assert owners_of(planned).count("bob") == 2 and owners_of(planned).count("alice") == 20


def test_turns_are_remembered_across_claims() -> None:
    fairness = Fairness(lane_min_share=0.0, batch_size=4)
    alice, bob = jobs("alice", NATIVE, 20), jobs("bob", NATIVE, 20)
    taken: list[Job] = []
    for _ in range(5):  # claims of one slot at a time
        [one] = fairness.order([j for j in alice + bob if j not in taken], slots=1).planned
        fairness.record([one])
        taken.append(one)
    assert owners_of(taken) == ["alice", "bob", "alice", "bob", "alice"]


def test_an_owner_does_not_bank_tokens_while_away() -> None:
    """alice ran alone for a long time; bob, arriving, takes turns with her rather than
    taking the lane until he has had as many tokens."""
    fairness = Fairness(lane_min_share=0.0, batch_size=8)
    for _ in range(50):
        claimed = fairness.order(jobs("alice", FILE, 8), slots=8).planned
        fairness.record(claimed)
    queue = jobs("alice", FILE, 20) + jobs("bob", FILE, 20)
    planned = fairness.order(queue, slots=8).planned
    assert owners_of(planned).count("alice") == 4 and owners_of(planned).count("bob") == 4


def test_bulk_lanes_stay_out_of_the_reserved_slots() -> None:
    fairness = Fairness(lane_min_share=0.1, batch_size=8)
    queue = jobs("a", FILE, 20) + jobs("a", NATIVE, 20)
    order = fairness.order(queue, slots=4, running={NATIVE: 3}, bulk_room=2)
    assert len(order.planned) == 2 and lanes_of(order.planned) == {FILE: 1, NATIVE: 1}
    assert len(order.all) == 40  # the others stay behind, in order
    # Interactive jobs may take every free slot.
    order = fairness.order(queue + jobs("b", INTERACTIVE, 5), slots=4, bulk_room=0)
    assert lanes_of(order.planned) == {INTERACTIVE: 4}
    # A job of n samples takes n slots.
    order = fairness.order(jobs("a", NATIVE, 3, n=2), slots=5)
    assert len(order.planned) == 2


def prompt(j: Job) -> int:
    return j.prompt_tokens


def budget(j: Job) -> int:
    return int(j.sampling["max_tokens"])


def test_select_batch_never_lets_a_length_pass_a_tier() -> None:
    anchor = job("a", NATIVE, prompt=100)
    near = [job("a", FILE, prompt=100) for _ in range(3)]
    far = [job("b", INTERACTIVE, prompt=400) for _ in range(2)]
    tiers = {j.id: 0 for j in far} | {j.id: 1 for j in near} | {anchor.id: 0}
    batch = select_batch(
        [anchor, *near, *far], prompt, budget, 3, 100_000, tier=lambda j: tiers[j.id]
    )
    assert batch == [anchor, *far]
    # Without tiers, the nearest lengths go, as before.
    assert select_batch([anchor, *near, *far], prompt, budget, 3, 100_000) == [anchor, *near[:2]]


def test_select_batch_keeps_bulk_rows_to_their_limit() -> None:
    candidates = jobs("a", NATIVE, 6) + jobs("b", INTERACTIVE, 1)
    batch = select_batch(
        candidates,
        prompt,
        budget,
        max_batch_size=6,
        max_batch_tokens=100_000,
        bulk=lambda j: j.lane != INTERACTIVE,
        max_bulk=4,
    )
    assert lanes_of(batch) == {NATIVE: 4, INTERACTIVE: 1}


class NoDatabase(AbstractContextManager[Session]):
    def __enter__(self) -> Session:
        raise AssertionError("choosing among candidates reads no database")

    def __exit__(self, *exc: object) -> None:
        return None


def choice(**settings: Any) -> BatchChoice:
    values = {"max_batch_size": 8, "lane_min_share": 0.0, "interactive_slots": 2, **settings}
    services = Services(
        Settings(_env_file=None, **values),  # type: ignore[call-arg]
        NoDatabase,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        InProcessQueue(),
    )
    return BatchChoice(services, "tiny-random-mistral", "w1")


def test_a_static_batch_takes_higher_lanes_before_nearer_lengths() -> None:
    chooser = choice(refill=False)
    message = job("a", FILE, prompt=50)
    same_length = jobs("a", FILE, 20, prompt=50)
    interactive = jobs("b", INTERACTIVE, 3, prompt=900)
    native = jobs("c", NATIVE, 2, prompt=10)
    chosen = chooser._choose([message, *interactive, *native, *same_length], message.id)
    assert chosen[0] is message  # the message's job is first, whatever its lane
    assert set(interactive + native) <= set(chosen) and len(chosen) == 8


def test_a_static_batch_picks_neighbours_by_length_within_an_owners_share() -> None:
    chooser = choice(refill=False, max_batch_size=4)
    message = job("a", NATIVE, prompt=100)
    lengths = [500, 20, 101, 99, 700, 102, 300]
    queue = [job("a", NATIVE, prompt=n) for n in lengths]
    chosen = chooser._choose([message, *queue], message.id)
    assert [j.prompt_tokens for j in chosen] == [100, 101, 99, 102]


def test_a_batch_that_will_be_refilled_leaves_the_interactive_slots_free_of_bulk() -> None:
    bulk = jobs("a", NATIVE, 10) + jobs("b", FILE, 10)
    chosen = choice(refill=True)._choose(bulk)
    assert len(chosen) == 6  # 8 slots, 2 kept for interactive jobs
    interactive = jobs("c", INTERACTIVE, 1)
    chosen = choice(refill=True)._choose(bulk + interactive)
    assert lanes_of(chosen)[INTERACTIVE] == 1 and len(chosen) == 7
    # A batch run to its end keeps no slots back.
    assert len(choice(refill=False)._choose(bulk)) == 8


@pytest.mark.parametrize("share", [0.1, 0.2, 0.25])
def test_a_static_batch_gives_every_lane_its_share(share: float) -> None:
    chooser = choice(refill=False, lane_min_share=share)
    queue = jobs("a", INTERACTIVE, 20) + jobs("b", NATIVE, 20) + jobs("c", FILE, 20)
    chosen = chooser._choose(queue)
    each = min_slots(share, 8)
    assert lanes_of(chosen)[NATIVE] == each and lanes_of(chosen)[FILE] == each
    assert lanes_of(chosen)[INTERACTIVE] == 8 - 2 * each
