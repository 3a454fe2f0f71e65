"""Lanes and owners' turns in a worker's claims, against real Postgres (and SQLite, the
embedded default): interactive jobs before native before file-batch lines, every lane its
minimum share, owners taking turns, the slots kept for interactive jobs, and no straggler
wait for an interactive job."""

import secrets
import time
from collections import Counter
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, insert, inspect
from sqlalchemy.orm import Session

from jobs import queries
from jobs.db import session_scope
from jobs.models import Base, Job, JobStatus, Lane
from jobs.queries import Claim, OwnerRotation
from jobs.queue import InProcessQueue
from jobs.settings import Settings
from jobs.streams import interactive_key
from jobs.timeutil import utcnow
from tests import services
from tests.factories import make_job
from tests.integration.test_worker_refill import runtime
from worker.batch_choice import INTERACTIVE_POLL_SECONDS, BatchChoice
from worker.claims import prepare_rows
from worker.engine.loader import LoadedModel
from worker.runtime import WorkerRuntime, _RefilledBatch
from worker.services import Services

MODEL = "tiny-random-mistral"
INTERACTIVE, NATIVE, FILE = Lane.interactive.value, Lane.native.value, Lane.file_batch.value
COLUMNS = [attr.key for attr in inspect(Job).column_attrs]


class Queue:
    """Queued jobs copied from one made through the submission path, each with its owner,
    lane and place in the queue (older first, in the order they are added)."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        template = make_job(session, settings, owner="template")
        self.template = {key: getattr(template, key) for key in COLUMNS}
        template.status = JobStatus.cancelled
        session.commit()
        self.clock = utcnow() - timedelta(hours=1)

    def add(self, owner: str, lane: int, count: int, **values: Any) -> list[str]:
        rows = []
        for _ in range(count):
            self.clock += timedelta(milliseconds=1)
            rows.append(
                {
                    **self.template,
                    "id": "job_" + secrets.token_hex(10),
                    "owner": owner,
                    "lane": lane,
                    "created_at": self.clock,
                    "status": JobStatus.queued,
                    **values,
                }
            )
        self.session.execute(insert(Job), rows)
        self.session.commit()
        return [row["id"] for row in rows]


def choice_for(settings: Settings) -> BatchChoice:
    scope = partial(session_scope, settings.database_url)
    return BatchChoice(Services(settings, scope, None, InProcessQueue()), MODEL, "w1")  # type: ignore[arg-type]


def lanes(claims: list[Claim]) -> Counter[int]:
    return Counter(claim.job.lane for claim in claims)


def owners(claims: list[Claim]) -> Counter[str]:
    return Counter(claim.job.owner for claim in claims)


def settings_for(api_settings: Settings, **values: Any) -> Settings:
    base = {"lane_min_share": 0.0, "interactive_slots": 2, "refill": False, "batch_wait_ms": 0}
    return api_settings.model_copy(update={**base, **values})


def test_interactive_jobs_are_claimed_before_native_before_file_lines(
    db: Session, api_settings: Settings
) -> None:
    queue = Queue(db, api_settings)
    # Queued oldest first: file lines, then native jobs, then interactive ones.
    file_lines = queue.add("alice", FILE, 6)
    native = queue.add("bob", NATIVE, 6)
    interactive = queue.add("carol", INTERACTIVE, 3)
    choice = choice_for(settings_for(api_settings, max_batch_size=4))
    first, second, third, fourth = (choice.claim() for _ in range(4))
    assert {c.job.id for c in first} == set(interactive) | {native[0]}
    assert [c.job.id for c in second] == native[1:5]
    assert [c.job.id for c in third] == native[5:] + file_lines[:3]
    assert [c.job.id for c in fourth] == file_lines[3:]
    assert choice.claim() == []


def test_each_lane_with_work_keeps_its_minimum_share(db: Session, api_settings: Settings) -> None:
    queue = Queue(db, api_settings)
    queue.add("alice", FILE, 30)
    queue.add("bob", NATIVE, 30)
    queue.add("carol", INTERACTIVE, 30)
    settings = settings_for(api_settings, max_batch_size=10, lane_min_share=0.2)
    claims = choice_for(settings).claim()
    assert lanes(claims) == {INTERACTIVE: 6, NATIVE: 2, FILE: 2}
    # Without shares, the interactive lane would take the whole batch.
    claims = choice_for(settings.model_copy(update={"lane_min_share": 0.0})).claim()
    assert lanes(claims) == {INTERACTIVE: 10}


def test_owners_take_turns_in_a_lane(db: Session, api_settings: Settings) -> None:
    queue = Queue(db, api_settings)
    queue.add("alice", FILE, 500)  # alice's batch was queued first
    bobs = queue.add("bob", FILE, 5)
    choice = choice_for(settings_for(api_settings, max_batch_size=8))
    first, second = choice.claim(), choice.claim()
    assert owners(first) == {"alice": 4, "bob": 4}
    assert set(bobs) <= {c.job.id for c in first + second}


def test_more_owners_than_a_look_takes_each_get_their_turn(
    db: Session, api_settings: Settings
) -> None:
    queue = Queue(db, api_settings)
    for owner in ("ann", "ben", "cat", "dan", "eve"):
        queue.add(owner, NATIVE, 4)
    settings = settings_for(api_settings, max_batch_size=2, claim_owners=2)
    choice = choice_for(settings)
    seen = [sorted(owners(choice.claim())) for _ in range(3)]
    assert seen == [["ann", "ben"], ["cat", "dan"], ["ann", "eve"]]
    # The look itself: at most claim_owners owners, going round after the last one.
    rotation = OwnerRotation(owners_per_lane=3, start_after={NATIVE: "dan"})
    found = queries.queued_owners(db, MODEL, (INTERACTIVE, NATIVE), rotation)
    db.commit()
    assert found == {INTERACTIVE: [], NATIVE: ["eve", "ann", "ben"]}
    assert rotation.start_after == {NATIVE: "ben"}


def test_the_message_job_is_still_first(db: Session, api_settings: Settings) -> None:
    queue = Queue(db, api_settings)
    queue.add("carol", INTERACTIVE, 5)
    [line] = queue.add("alice", FILE, 1)
    claims = choice_for(settings_for(api_settings, max_batch_size=3)).claim(first_id=line)
    assert claims[0].job.id == line and lanes(claims) == {FILE: 1, INTERACTIVE: 2}


def test_a_batch_to_be_refilled_keeps_its_interactive_slots_free_of_bulk(
    db: Session, api_settings: Settings
) -> None:
    queue = Queue(db, api_settings)
    queue.add("alice", FILE, 20)
    queue.add("bob", NATIVE, 20)
    settings = settings_for(api_settings, max_batch_size=8, refill=True)
    claims = choice_for(settings).claim()
    assert len(claims) == 6 and INTERACTIVE not in lanes(claims)
    [interactive] = queue.add("carol", INTERACTIVE, 1)
    claims = choice_for(settings).claim()
    assert len(claims) == 7 and interactive in {c.job.id for c in claims}


def running_batch(worker: WorkerRuntime) -> _RefilledBatch:
    """A refilled batch with the rows of a first claim joined, as `run` starts it."""
    claims = worker.choice.claim()
    batch = _RefilledBatch(worker, list(claims))
    batch._join(prepare_rows(claims, worker.loaded.tokenizer, worker.results.fail))
    return batch


def test_a_refill_takes_a_small_batch_s_lines_in_its_first_claims(
    db: Session, api_settings: Settings, loaded: LoadedModel, tmp_path: Path
) -> None:
    queue = Queue(db, api_settings)
    queue.add("alice", FILE, 500)  # alice's 500 lines, queued before bob's 5
    bobs = queue.add("bob", FILE, 5)
    settings = settings_for(api_settings, max_batch_size=10, refill=True)
    batch = _RefilledBatch(runtime(settings, loaded, tmp_path), [])
    first = batch._refill(8)
    batch.active.clear()  # the rows finished
    second = batch._refill(8)
    assert len(first) == len(second) == 8
    claimed = [claim.job for claim in batch.claimed]
    assert Counter(job.owner for job in claimed[:8]) == {"alice": 4, "bob": 4}
    assert set(bobs) <= {job.id for job in claimed}


def test_the_reserved_slots_take_only_interactive_jobs(
    db: Session, api_settings: Settings, loaded: LoadedModel, tmp_path: Path
) -> None:
    queue = Queue(db, api_settings)
    queue.add("alice", FILE, 30)
    queue.add("bob", NATIVE, 30)
    settings = settings_for(api_settings, max_batch_size=8, refill=True)
    batch = running_batch(runtime(settings, loaded, tmp_path))
    assert len(batch.active) == 6  # 2 of 8 slots kept for interactive jobs
    # Only the kept slots are free: bulk work waits, however much of it is queued.
    assert batch._refill(2) == []
    time.sleep(INTERACTIVE_POLL_SECONDS)
    assert batch._refill(2) == []
    [interactive] = queue.add("carol", INTERACTIVE, 1)
    # As the API does for each interactive job: the worker looks at the step after it.
    redis.Redis.from_url(settings.broker_url).incr(interactive_key(MODEL))
    [joined] = batch._refill(2)
    assert isinstance(joined.key, int)
    assert batch.active[joined.key].claim.job.id == interactive
    # A bulk row that ends frees a slot for bulk work again; the kept one stays free of it.
    batch.active.pop(next(iter(batch.active)))
    assert len(batch._refill(2)) == 1 and batch.claimed[-1].job.lane != INTERACTIVE
    bulk = sum(row.claim.job.lane != INTERACTIVE for row in batch.active.values())
    assert bulk == 6 and len(batch.active) == 7


def test_an_interactive_job_does_not_wait_for_stragglers(
    db: Session, api_settings: Settings, loaded: LoadedModel, tmp_path: Path
) -> None:
    settings = api_settings.model_copy(
        update={"batch_wait_ms": 2000, "batch_quiet_ms": 2000, "refill": True}
    )
    worker = runtime(settings, loaded, tmp_path)
    queue = Queue(db, api_settings)

    def handled(lane: int) -> float:
        [job_id] = queue.add("carol", lane, 1)
        started = time.monotonic()
        assert worker.handle_message(job_id) == 1
        return time.monotonic() - started

    assert handled(INTERACTIVE) < 1.5
    assert handled(NATIVE) >= 2.0  # the wait it skipped


def test_lanes_and_turns_on_sqlite(tmp_path: Path, api_settings: Settings) -> None:
    """The embedded default runs the same claim (without row locks)."""
    url = f"sqlite:///{tmp_path / 'mbatch.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    settings = settings_for(api_settings, database_url=url, max_batch_size=6)
    with session_scope(url) as session:
        queue = Queue(session, settings)
        queue.add("alice", FILE, 50)
        queue.add("bob", FILE, 3)
        native = queue.add("dan", NATIVE, 2)
        queue.add("carol", INTERACTIVE, 1)
    first = choice_for(settings).claim()
    assert lanes(first) == {INTERACTIVE: 1, NATIVE: 2, FILE: 3}
    assert set(native) <= {c.job.id for c in first}
    assert owners(first)["bob"] >= 1 and owners(first)["alice"] >= 1
    with session_scope(url) as session:
        assert queries.count_queued(session, MODEL, at_most=100, lanes=(INTERACTIVE,)) == 0
        assert queries.count_queued(session, MODEL, at_most=100, lanes=(FILE,)) == 50
        # An owner with more fills in for one with fewer (a second look, after the first's).
        found = queries.queued_candidates(session, MODEL, 20, lanes=(FILE,))
        assert Counter(job.owner for job in found) == {"alice": 18, "bob": 2}
        assert len({job.id for job in found}) == 20


def test_owners_with_more_fill_in_for_those_with_fewer(db: Session, api_settings: Settings) -> None:
    queue = Queue(db, api_settings)
    same_instant = utcnow() - timedelta(hours=2)
    alices = queue.add("alice", FILE, 10, created_at=same_instant)
    bobs = queue.add("bob", FILE, 1)
    dans = queue.add("dan", NATIVE, 30)
    found = queries.queued_candidates(db, MODEL, 8, lane_min=2)
    db.commit()
    # Lanes first (native may fill the window, file lines get their 2 at least), then more
    # from the owners who had more: alice's lines, created in one instant, each once.
    assert [job.id for job in found if job.owner == "dan"] == dans[:8]
    ids = [job.id for job in found if job.lane == FILE]
    assert len(ids) == len(set(ids)) == 2 and set(ids) <= set(alices + bobs)
    found = queries.queued_candidates(db, MODEL, 12, lanes=(FILE,))
    db.commit()
    assert Counter(job.owner for job in found) == {"alice": 10, "bob": 1}
    assert len({job.id for job in found}) == 11


def test_a_full_batch_looks_for_interactive_jobs_when_the_api_signals_one(
    db: Session, api_settings: Settings
) -> None:
    """Between its slower checks, a worker whose bulk slots are full probes Postgres for an
    interactive job only when the API's counter moved: at the step after the job came."""
    settings = settings_for(api_settings, broker_url=services.redis_url())
    choice = choice_for(settings)
    queue = Queue(db, settings)
    assert choice.interactive_waiting() is False  # the first look: nothing queued
    queue.add("ivy", INTERACTIVE, 1)
    assert choice.interactive_waiting() is False  # no signal, and the last look was just now
    redis.Redis.from_url(settings.broker_url).incr(interactive_key(MODEL))
    assert choice.interactive_waiting() is True  # the signal: looked at once
    assert choice.interactive_waiting() is False  # it has not moved since


def test_without_redis_a_full_batch_looks_every_few_steps(
    db: Session, api_settings: Settings
) -> None:
    down = f"redis://127.0.0.1:{services.free_port()}/0"
    choice = choice_for(settings_for(api_settings, broker_url=down))
    queue = Queue(db, api_settings)
    assert choice.interactive_waiting() is False
    queue.add("ivy", INTERACTIVE, 1)
    time.sleep(INTERACTIVE_POLL_SECONDS * 1.5)
    assert choice.interactive_waiting() is True
