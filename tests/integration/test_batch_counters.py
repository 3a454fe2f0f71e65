"""A batch's counters on its row: every way a line can end counts it once, in the transaction
that ends it; the GET and the list read the row and never the lines; and once the batch has
ended its counts are frozen, exact."""

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session

from jobs import batches, queries
from jobs.batches.store import has_unfinished_lines, spent
from jobs.db import get_engine, session_scope
from jobs.models import Batch, Job, JobStatus
from jobs.queries import Claim, Outcome
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from jobs.timeutil import utcnow
from tests.integration.test_batch_steps import advance, chat_line, start_batch

MODEL = "tiny-random-mistral"
LINES = 10


@pytest.fixture
def db(api_settings: Settings) -> Iterator[Session]:
    with session_scope(api_settings.database_url) as session:
        yield session


def claim_line(session: Session, batch_id: str, line: int) -> Claim:
    job_id = batches.line_job_id(batch_id, line)
    [claim] = queries.claim_batch(session, MODEL, "w", 60, 1, first_id=job_id)
    assert claim.job.id == job_id
    return claim


def outcome(tokens: int, cost: str) -> Outcome:
    return Outcome(tokens, "stop", "text", None, Decimal(cost), Decimal(cost), 0.1)


def counters(session: Session, batch_id: str) -> tuple[int, int, int, int, Decimal]:
    session.expire_all()
    batch = session.get(Batch, batch_id)
    assert batch is not None
    return (
        batch.lines_succeeded,
        batch.lines_failed,
        batch.prompt_tokens,
        batch.completion_tokens,
        batch.cost,
    )


def counted_from_lines(session: Session, batch_id: str) -> tuple[int, int, int, int, Decimal]:
    by_status = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
    )
    prompt, completion, cost = spent(session, batch_id)
    failed = by_status.get(JobStatus.failed, 0) + by_status.get(JobStatus.cancelled, 0)
    return by_status.get(JobStatus.succeeded, 0), failed, prompt, completion, cost


class JobsRead:
    """The statements run on the jobs table while it is open."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.statements = engine, list[str]()

    def _capture(self, conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if " jobs" in statement:
            self.statements.append(statement)

    def __enter__(self) -> "JobsRead":
        event.listen(self.engine, "before_cursor_execute", self._capture)
        return self

    def __exit__(self, *_: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._capture)


def test_every_way_a_line_ends_is_counted_once_and_the_routes_read_only_the_batch_row(
    client: TestClient, alice: dict[str, str], api_settings: Settings, db: Session
) -> None:
    lines = [json.dumps(chat_line(f"line-{n}")).encode() for n in range(1, LINES + 1)]
    lines.insert(3, b'{"not": "a line"}')  # line 4 is refused: counted as invalid, not here
    batch_id = start_batch(client, alice, lines)["id"]
    assert counters(db, batch_id) == (0, 0, 0, 0, Decimal(0))

    # Succeeded, recorded twice (a redelivered message): counted once.
    first = claim_line(db, batch_id, 1)
    assert queries.record_success(db, first, outcome(5, "0.25"))
    assert not queries.record_success(db, first, outcome(5, "0.25"))
    assert queries.record_success(db, claim_line(db, batch_id, 2), outcome(7, "0.5"))
    # Failed by the engine.
    assert queries.record_failure(db, claim_line(db, batch_id, 3), "engine_error", "boom")
    # Given back after a failure of the whole decode, out of attempts: failed.
    assert queries.release_claims(db, [claim_line(db, batch_id, 5)], 1, "oom") == []
    # Its worker died, out of attempts: failed by the set-based release.
    dead = claim_line(db, batch_id, 6)
    db.execute(
        update(Job).where(Job.id == dead.job.id).values(lease_expires_at=utcnow() - timedelta(1))
    )
    db.commit()
    queries.release_expired(db, max_attempts=1)
    # Cancelled as a job, while running: its late result is not recorded, nor counted.
    running = claim_line(db, batch_id, 7)
    cancelled = client.post(f"/v1/jobs/{running.job.id}/cancel", headers=alice)
    assert cancelled.json()["status"] == "cancelled"
    assert not queries.record_success(db, running, outcome(9, "1"))
    # Cancelled as a job, while queued.
    queued_id = batches.line_job_id(batch_id, 8)
    assert client.post(f"/v1/jobs/{queued_id}/cancel", headers=alice).status_code == 200

    assert counters(db, batch_id) == counted_from_lines(db, batch_id)
    # Lines 1, 2 succeeded; 3, 5, 6, 7, 8 failed or cancelled; prompt tokens as counted.
    succeeded, failed, prompt, completion, cost = counters(db, batch_id)
    assert (succeeded, failed, completion, cost) == (2, 5, 12, Decimal("1.5"))
    assert prompt > 0

    engine = get_engine(api_settings.database_url)
    with JobsRead(engine) as read:
        shown = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
        listed = client.get("/v1/batches?limit=100", headers=alice).json()
    assert read.statements == []
    assert shown["status"] == "in_progress"
    assert shown["request_counts"] == {"total": LINES + 1, "completed": 2, "failed": 1 + 5}
    assert shown["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 12,
        "total_tokens": prompt + 12,
        "estimated_cost": 1.5,
    }
    assert [b for b in listed["data"] if b["id"] == batch_id] == [shown]

    # The batch is cancelled: its three lines left are stopped, and counted with the rest.
    stopped = client.post(f"/v1/batches/{batch_id}/cancel", headers=alice).json()
    assert stopped["request_counts"] == {"total": LINES + 1, "completed": 2, "failed": 1 + 8}
    assert counters(db, batch_id) == counted_from_lines(db, batch_id)

    # Finalized: the counts are those of its files, and frozen there.
    advance(api_settings, storage_from_settings(api_settings))
    ended = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert ended["status"] == "cancelled"
    assert ended["request_counts"] == {"total": LINES + 1, "completed": 2, "failed": 9}
    assert ended["usage"] == shown["usage"]
    frozen = counters(db, batch_id)
    queries.count_lines_ended(db, batch_id, succeeded=1, completion_tokens=3, cost=Decimal(1))
    db.commit()
    assert counters(db, batch_id) == frozen


def test_a_batch_is_done_when_its_last_line_ends_whichever_way_it_ends(
    client: TestClient, alice: dict[str, str], db: Session
) -> None:
    lines = [json.dumps(chat_line(f"l{n}")).encode() for n in (1, 2)]
    batch_id = start_batch(client, alice, lines)["id"]
    assert has_unfinished_lines(db, batch_id)
    assert queries.record_success(db, claim_line(db, batch_id, 1), outcome(1, "0"))
    assert has_unfinished_lines(db, batch_id)
    assert queries.record_failure(db, claim_line(db, batch_id, 2), "engine_error", "x")
    assert not has_unfinished_lines(db, batch_id)
