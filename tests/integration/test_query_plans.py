"""The plans Postgres makes for the hot queries: every one reads the jobs table through an
index, however long the queue and the history.

Each query is captured as the code really runs it (a `before_cursor_execute` listener while
the function is called), then explained with the same parameters, and the plan is printed
(`pytest -s` shows them all; a failure shows its own).

The table is filled the way a busy deployment's is: a long history of finished jobs, a deep
queue of one model (most published, some never, some long ago), another model's queue,
running jobs with live and expired leases, scheduled jobs, and a batch of 5,000 lines; then
ANALYZE. The planner is left free to choose (no `enable_seqscan = off`): the plans are those
it would make in production, and a query no index can serve, or one an index serves worse
than reading the whole table (a condition that matches much of it, an ORDER BY the index
cannot give), comes out as a `Seq Scan on jobs` and fails here. With the planner free, a
plan could also flip on a change of cost settings or statistics that makes a full read look
cheaper; the proportions below keep every hot query far from that edge.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from jobs import queries
from jobs.batches.store import has_unfinished_lines, stop_jobs
from jobs.db import get_engine, get_session_factory
from jobs.queries import Claim, Outcome
from jobs.settings import Settings
from migrations.runner import upgrade
from tests import services
from tests.factories import make_job

MODEL = "tiny-random-mistral"
OTHER_MODEL = "mistral-7b-instruct-v0.1"
BATCH_ID = "batch_plans"
BATCH_LINES = 5000

# (how many, id prefix, the columns that differ from the template job, in SQL over `g`)
ROWS = (
    # The history: finished jobs of every kind, the bulk of the table.
    (
        60000,
        "done",
        {
            "status": "(ARRAY['succeeded', 'failed', 'cancelled'])[1 + mod(g, 3)]",
            "created_at": "now() - interval '20 days' + g * interval '1 second'",
            "enqueued_at": "now() - interval '20 days'",
            "finished_at": "now() - interval '19 days' + g * interval '1 second'",
            "attempts": "1",
        },
    ),
    # The queue: published just now, never published, published long ago.
    (
        20000,
        "live",
        {"status": "'queued'", "created_at": "now() - interval '1 hour' + g * interval '1 ms'"},
    ),
    (
        2000,
        "unpub",
        {
            "status": "'queued'",
            "created_at": "now() - interval '2 hours' + g * interval '1 ms'",
            "enqueued_at": "NULL",
        },
    ),
    (
        2000,
        "stale",
        {
            "status": "'queued'",
            "created_at": "now() - interval '3 hours' + g * interval '1 ms'",
            "enqueued_at": "now() - interval '3 hours'",
        },
    ),
    (3000, "other", {"status": "'queued'", "model": f"'{OTHER_MODEL}'"}),
    # The lanes: many owners' file-batch lines, and a few interactive jobs.
    (
        10000,
        "bulk",
        {"status": "'queued'", "lane": "2", "owner": "'owner' || mod(g, 40)", "line": "g"},
    ),
    (30, "inter", {"status": "'queued'", "lane": "0", "owner": "'caller' || mod(g, 5)"}),
    # Running: most renewing their leases, some whose worker died.
    (
        1000,
        "run",
        {
            "status": "'running'",
            "attempts": "1",
            "claim_token": "'t' || g",
            "lease_expires_at": "now() + interval '10 minutes'",
        },
    ),
    (
        300,
        "dead",
        {
            "status": "'running'",
            "attempts": "1 + mod(g, 3)",
            "claim_token": "'t' || g",
            "lease_expires_at": "now() - interval '10 minutes'",
        },
    ),
    # Scheduled: half due.
    (
        600,
        "sched",
        {"status": "'scheduled'", "run_at": "now() + (g - 300) * interval '1 second'"},
    ),
    # A batch's lines, a third of them finished.
    (
        BATCH_LINES,
        "line",
        {
            "status": "(ARRAY['queued', 'succeeded', 'running'])[1 + mod(g, 3)]",
            "lane": "2",
            "batch_id": f"'{BATCH_ID}'",
            "line": "g",
            "claim_token": "'t' || g",
            "lease_expires_at": "now() + interval '10 minutes'",
            "completion_tokens": "3",
            "cost_input": "0.001",
            "cost_output": "0.002",
        },
    ),
)

COPIED = (
    "owner model lora lora_id status input sampling metadata callback_url created_at run_at "
    "enqueued_at finished_at attempts claim_token lease_expires_at batch_id line prompt_tokens "
    "completion_tokens cost_input cost_output lane"
).split()


def fill(url: str, template_id: str) -> None:
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        for count, prefix, values in ROWS:
            columns = ", ".join(values.get(column, column) for column in COPIED)
            conn.execute(
                f"INSERT INTO jobs (id, {', '.join(COPIED)})"  # type: ignore[arg-type]
                f" SELECT '{prefix}_' || g, {columns}"
                f" FROM jobs, generate_series(1, {count}) AS g WHERE jobs.id = %s",
                (template_id,),
            )
        conn.execute("VACUUM ANALYZE jobs")


@dataclass
class Plans:
    engine: Engine
    session: Session
    settings: Settings

    def run(self, call: Callable[[Session], Any]) -> tuple[Any, list[tuple[str, Any]]]:
        """Call `call` with the session; what it returned, and the statements it ran on the
        jobs table, with their parameters."""
        ran: list[tuple[str, Any]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            if " jobs" in statement and not executemany:
                ran.append((statement, parameters))

        event.listen(self.engine, "before_cursor_execute", capture)
        try:
            result = call(self.session)
        finally:
            event.remove(self.engine, "before_cursor_execute", capture)
        return result, ran

    def explain(self, statement: str, parameters: Any) -> str:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
            conn.rollback()
        return "\n".join(row[0] for row in rows)


@pytest.fixture(scope="module")
def plans(api_settings: Settings) -> Iterator[Plans]:
    """A database of its own, filled as above: the other tests' stay small and quick."""
    name = services.create_database()
    url = services.database_url(name)
    upgrade(url, quiet=True)
    settings = api_settings.model_copy(update={"database_url": url})
    session = get_session_factory(url)()
    try:
        fill(url, make_job(session, settings).id)
        yield Plans(get_engine(url), session, settings)
    finally:
        session.close()
        get_engine(url).dispose()
        services.drop_database(name)


def first_batch(session: Session) -> list[Claim]:
    return queries.claim_batch(session, MODEL, "w", 60, 128, choose=lambda jobs: jobs[:32])


OUTCOME = Outcome(3, "length", "abc", None, Decimal(0), Decimal(0), 0.1)


@dataclass(frozen=True)
class Hot:
    """A hot query: `call` runs it, given what `setup` (not explained) returned. None may
    sort rows of jobs: the claim and publishing read an index in the order they need, and a
    sort there means every queued row was read first."""

    call: Callable[[Session, Any], Any]
    setup: Callable[[Session], Any] = lambda _: None


HOT: dict[str, Hot] = {
    "claim": Hot(lambda s, _: first_batch(s)),
    "claim with the message's job first": Hot(
        lambda s, _: queries.claim_batch(
            s, MODEL, "w", 60, 128, first_id="live_20000", choose=lambda jobs: jobs[:32]
        )
    ),
    # A worker's claim: every lane's owners (a loose index scan of the lane index, going
    # round after the owner it started from), then each one's oldest jobs.
    "claim by lanes and owners' turns": Hot(
        lambda s, _: queries.claim_batch(
            s,
            MODEL,
            "w",
            60,
            128,
            choose=lambda jobs: jobs[:32],
            lane_min=16,
            rotation=queries.OwnerRotation(16, {0: "caller2", 2: "owner17"}),
        )
    ),
    # A refill when only the interactive slots are free: the lane alone, then one probe a step.
    "claim from the interactive lane": Hot(
        lambda s, _: queries.claim_batch(
            s, MODEL, "w", 60, 8, choose=lambda jobs: jobs[:2], lanes=(0,), lane_min=4
        )
    ),
    "count_queued": Hot(lambda s, _: queries.count_queued(s, MODEL, at_most=32)),
    "count_queued of the interactive lane": Hot(
        lambda s, _: queries.count_queued(s, MODEL, lanes=(0,))
    ),
    "queued_lane": Hot(lambda s, _: queries.queued_lane(s, "bulk_17")),
    "is_queued": Hot(lambda s, _: queries.is_queued(s, "live_19000")),
    "due_for_publish": Hot(lambda s, _: queries.due_for_publish(s, 600, 32)),
    "forget_enqueued": Hot(lambda s, _: queries.forget_enqueued(s, ["unpub_1", "unpub_2"])),
    "release_expired": Hot(lambda s, _: queries.release_expired(s, 3)),
    "expired_claims": Hot(lambda s, _: queries.expired_claims(s)),
    "lost_claims": Hot(queries.lost_claims, setup=first_batch),
    "renew_leases": Hot(lambda s, claims: queries.renew_leases(s, claims[:2], 60), first_batch),
    "record_success": Hot(
        lambda s, claims: queries.record_success(s, claims[0], OUTCOME), first_batch
    ),
    "record a batch line's success": Hot(
        lambda s, claims: queries.record_success(s, claims[0], OUTCOME),
        lambda s: queries.claim_batch(s, MODEL, "w", 60, 1, first_id="line_3"),
    ),
    # Whether a batch is done: one probe of the partial index of lines that have not ended.
    "batch: done check": Hot(lambda s, _: has_unfinished_lines(s, BATCH_ID)),
    # Last: it cancels the batch's lines that have not ended.
    "batch: stop its lines": Hot(lambda s, _: stop_jobs(s, BATCH_ID, "batch_cancelled", "x")),
}


def sorts_the_table(plan: str) -> list[str]:
    """The plan's sorts of rows read from jobs (a sort of a subquery's few ids is none):
    where the claim or publishing sorts, it has read every queued row to find the first."""
    return [
        line.strip()
        for line in plan.splitlines()
        if "Sort Key:" in line and "ANY_subquery" not in line
    ]


@pytest.mark.parametrize("name", list(HOT))
def test_the_hot_query_reads_jobs_through_an_index(plans: Plans, name: str) -> None:
    hot = HOT[name]
    prepared = hot.setup(plans.session)
    _, ran = plans.run(lambda session: hot.call(session, prepared))
    assert ran, f"{name} ran no statement on jobs"
    for statement, parameters in ran:
        plan = plans.explain(statement, parameters)
        # The statement as run (an IN list or a CASE of ids cut short), and its plan whole.
        shown = f"--- {name}\n{statement[:700]}\n{plan}"
        print(shown)
        assert "Seq Scan on jobs" not in plan, shown
        assert not sorts_the_table(plan), shown
