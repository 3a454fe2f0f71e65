"""The paths the worker and the API run all the time, against a queue of 10k, 100k and 300k
jobs: each should cost the same whatever the size of the queue and of the history.

A database made for the run (and dropped after) is filled, through the project's own
functions, with queued jobs of one model (`tiny-random-mistral`): a few are submitted as a
client submits them (`prepare_native` + `submit_job`), and copied by SQL, with new ids and
creation times spread over the hours before the run (each published when it was created), up
to each size in turn. Beside them: 100 small batches, finalized, and one 50,000-line
Batches-API batch (with a `max_cost` it never reaches), uploaded and validated through the real
path (`create_file`, `create_batch`, `validate_batch`, a local-folder storage), its first half
of lines then marked succeeded, with tokens and cost, by SQL: a batch half done, whose other
25,000 lines wait in the queue beside the N jobs. It is the newest batch, so the list's page
holds it and 99 small ones.

At each size, p50 and p99 over `--reps` runs (after a warm-up run) of:
- the claim of a batch (`BatchChoice.claim`, the worker's own: `claim_batch` with its choice
  of jobs, over `max_batch_size * claim_lookahead` candidates), with the message's job first (a
  queued job taken at random) and without;
- the straggler wait's check on a full queue (`BatchChoice.wait_for_stragglers`);
- a maintenance pass (`run_pass`, with a queue that only counts what it publishes);
- the checks the worker runs after each static batch of the 50,000-line batch: whether it is
  done (`finalize_if_done`: a probe of the partial index of unfinished lines) and its
  `max_cost` (`enforce_max_cost`: the cost counted on the batch's row);
- `GET /v1/batches/{id}` of the half-done batch and `GET /v1/batches?limit=100`, through the
  API app in process (`TestClient`), with a key of the batches' owner.

Each run of a path that writes is one database transaction rolled back after it: the
sessions the code asks for are savepoints in it, so a commit of the code is a savepoint
released (a real commit costs a fraction of a millisecond more here, printed at the start),
and the queue is the same for every run. The API's requests commit for real (they only read).

At the largest size, the SQL each path ran is explained (`EXPLAIN`, not run) and printed, with
the plans that scan the jobs table whole counted. Then the batch's other lines are marked
succeeded, the batch is finalized (`finalize`) and its GET is timed again, finished.

The figures are printed as they come; the last line is one JSON object, its keys named by
the largest size run (`claim_p50_ms_300k` with the default sizes), the growth of the claim
being its p50 at the largest size over its p50 at the smallest.

Needs Postgres on 127.0.0.1 (`MBATCH_TEST_PG_ADMIN`); no broker, no worker process.

    python bench/queue_scale.py [--sizes 10000,100000,300000] [--reps 40]
"""

import argparse
import functools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.app import create_app  # noqa: E402
from jobs import batches, files  # noqa: E402
from jobs.db import get_engine, session_scope, unit_of_work  # noqa: E402
from jobs.keys import create_key  # noqa: E402
from jobs.maintenance import enforce_max_cost, run_pass  # noqa: E402
from jobs.queue import InProcessQueue  # noqa: E402
from jobs.schemas.batches import BatchCreate  # noqa: E402
from jobs.schemas.native import JobCreate, Message  # noqa: E402
from jobs.service import prepare_native, submit_job  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.storage import LocalStorage, Storage  # noqa: E402
from migrations.runner import upgrade  # noqa: E402
from tests import services  # noqa: E402
from worker.batch_choice import BatchChoice  # noqa: E402
from worker.services import Services  # noqa: E402

MODEL = "tiny-random-mistral"
OWNER = "bench"
DEFAULT_SIZES = "10000,100000,300000"
BATCH_LINES = 50_000
SMALL_BATCHES = 100
TEMPLATES = 16
WARMUP = 1
# The copies' creation times: one every 50 ms from six hours before the run (300k span
# about four hours), each published when it was made, so all are past the requeue delay.
SPREAD_START = timedelta(hours=6)
SPREAD_STEP = "50 milliseconds"
WORDS = "river stone light garden window quiet morning silver paper music orange winter".split()
Scope = Callable[[], AbstractContextManager[Session]]


# --- the database: made and filled ------------------------------------------------------


def make_settings(database_url: str, storage_dir: Path) -> Settings:
    """The defaults a deployment runs with, on this run's database and a local folder."""
    return Settings(
        database_url=database_url,
        storage_url=f"file://{storage_dir}",
        model=MODEL,
    )


def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))


def submit_templates(scope: Scope, settings: Settings, count: int) -> list[str]:
    """Jobs submitted as a client submits them (`POST /v1/jobs`'s path): the rows to copy."""
    rng = random.Random(1)
    ids = []
    queue = InProcessQueue()
    for n in range(count):
        text_ = prompt_text(rng)
        body = (
            JobCreate(prompt=text_, max_tokens=rng.randint(16, 256), model=MODEL)
            if n % 2
            else JobCreate(
                messages=[Message(role="user", content=text_)],
                max_tokens=rng.randint(16, 256),
                temperature=0.8,
                seed=n + 1,
                model=MODEL,
            )
        )
        with scope() as session:
            job, _ = submit_job(session, queue, OWNER, prepare_native(body, settings))
            ids.append(job.id)
    return ids


def job_columns(conn: Connection) -> list[str]:
    """The jobs table's columns as migrated (whatever the model says), less those the
    database fills itself."""
    return list(
        conn.execute(
            text(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'jobs'"
                " AND is_generated = 'NEVER' AND coalesce(identity_generation, '') <> 'ALWAYS'"
                " AND coalesce(column_default, '') NOT LIKE 'nextval(%'"
                " ORDER BY ordinal_position"
            )
        ).scalars()
    )


def copy_jobs(engine: Engine, templates: list[str], start: int, end: int, since: datetime) -> None:
    """Copies number start..end-1 of the submitted jobs, each a template's row with a new id,
    made (and published) `SPREAD_STEP` after the one before, from `since`."""
    with engine.begin() as conn:
        columns = job_columns(conn)
        made = f"CAST(:since AS timestamptz) + g * interval '{SPREAD_STEP}'"
        override = {
            "id": "'job_' || substr(md5('bench-' || g), 1, 24)",
            "created_at": made,
            "enqueued_at": made,
            "idempotency_key": "NULL",
        }
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join(override.get(c, f't."{c}"') for c in columns)
        conn.execute(
            text(
                f"INSERT INTO jobs ({names}) SELECT {values}"
                " FROM generate_series(:start, :end - 1) AS g"
                " JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS bench_k, *"
                "       FROM jobs WHERE id = ANY(:templates)) AS t"
                " ON t.bench_k = g % :count"
            ),
            {
                "start": start,
                "end": end,
                "templates": templates,
                "count": len(templates),
                "since": since,
            },
        )


def vacuum_analyze(engine: Engine) -> None:
    """As autovacuum would have, on a queue that grew over hours: statistics and the
    visibility map up to date."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("jobs", "batches", "batch_line_errors", "files"):
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")


def write_batch_file(out: BinaryIO, lines: int, seed: int) -> None:
    """An OpenAI batch input file of `lines` chat requests, prompts of 20 to 200 words."""
    rng = random.Random(seed)
    for n in range(lines):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt_text(rng)}],
            "max_tokens": rng.randint(16, 256),
            "seed": n + 1,
        }
        line = {"custom_id": f"row-{n}", "method": "POST", "url": "/v1/chat/completions"}
        out.write((json.dumps({**line, "body": body}) + "\n").encode())
    out.seek(0)


def make_batch(
    scope: Scope, storage: Storage, settings: Settings, lines: int, seed: int, **create: Any
) -> str:
    """A batch through the API's own path: the file kept, the batch made, then validated."""
    with tempfile.TemporaryFile() as stream, scope() as session:
        write_batch_file(stream, lines, seed)
        file = files.create_file(
            session,
            storage,
            OWNER,
            "input.jsonl",
            files.INPUT_PURPOSE,
            stream,
            settings.max_file_bytes,
            settings.max_file_lines,
        )
        body = BatchCreate(input_file_id=file.id, endpoint="/v1/chat/completions", **create)
        batch, _ = batches.create_batch(session, OWNER, body, settings)
        batch_id = batch.id
    batches.validate_batch(scope, storage, InProcessQueue(), settings, batch_id)
    return batch_id


def mark_succeeded(engine: Engine, batch_ids: list[str], lines: int | None = None) -> int:
    """The batches' first `lines` unfinished lines (all with None) end succeeded, with
    tokens, cost and an inline result, and are counted on their batch's row, as a worker
    records them. By SQL, in one statement, much faster than a worker."""
    with engine.begin() as conn:
        counted = conn.execute(
            text(
                "WITH ended AS ("
                " UPDATE jobs SET status = 'succeeded', completion_tokens = 64,"
                " finish_reason = 'length', response_text = repeat('word ', 64),"
                " cost_input = prompt_tokens * 0.0000002, cost_output = 64 * 0.0000006,"
                " compute_seconds = 0.05, attempts = 1, group_id = 'grp_bench',"
                " started_at = now(), finished_at = now(),"
                " claim_token = NULL, lease_expires_at = NULL"
                " WHERE id IN (SELECT id FROM jobs WHERE batch_id = ANY(:ids)"
                "   AND status IN ('scheduled', 'queued', 'running')"
                "   ORDER BY batch_id, line LIMIT :limit)"
                " RETURNING batch_id, prompt_tokens, completion_tokens,"
                "   cost_input + cost_output AS cost),"
                " per_batch AS (SELECT batch_id, count(*) AS n, sum(prompt_tokens) AS p,"
                "   sum(completion_tokens) AS c, sum(cost) AS k FROM ended GROUP BY batch_id)"
                " UPDATE batches SET lines_succeeded = lines_succeeded + n,"
                " prompt_tokens = batches.prompt_tokens + p,"
                " completion_tokens = batches.completion_tokens + c, cost = cost + k"
                " FROM per_batch WHERE batches.id = per_batch.batch_id RETURNING n"
            ),
            {"ids": batch_ids, "limit": lines},
        )
        return sum(int(n) for (n,) in counted)


def batch_status(engine: Engine, batch_id: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT status FROM batches WHERE id = :id"), {"id": batch_id}
            ).scalar_one()
        )


def queued_count(engine: Engine) -> tuple[int, int]:
    """Queued jobs of the model: all, and those of batches."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), count(batch_id) FROM jobs"
                " WHERE model = :model AND status = 'queued'"
            ),
            {"model": MODEL},
        ).one()
        return int(row[0]), int(row[1])


def jobs_size_mb(engine: Engine) -> float:
    with engine.connect() as conn:
        size = conn.execute(text("SELECT pg_total_relation_size('jobs')")).scalar_one()
        return float(size) / 1e6


def sample_queued(engine: Engine, count: int) -> list[str]:
    """Queued jobs (not a batch's) to be the message's job, one per run."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id FROM jobs WHERE model = :model AND status = 'queued'"
                    " AND batch_id IS NULL ORDER BY random() LIMIT :count"
                ),
                {"model": MODEL, "count": count},
            ).scalars()
        )


# --- the runs: each in a transaction rolled back, timed -----------------------------------


class Sandbox:
    """Runs of a path that leave the database as it was: a run is one transaction on one
    connection, rolled back after; the sessions the code asks for (`scope`) are savepoints
    in it, so that the code's commits are savepoints released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conn: Connection | None = None

    @contextmanager
    def run(self) -> Iterator[None]:
        with self.engine.connect() as conn:
            outer = conn.begin()
            self.conn = conn
            try:
                yield
            finally:
                self.conn = None
                outer.rollback()

    @contextmanager
    def scope(self) -> Iterator[Session]:
        """What `jobs.db.session_scope` is, inside the run's transaction."""
        if self.conn is None:
            raise RuntimeError("a sandbox session outside a run")
        session = Session(
            bind=self.conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        with unit_of_work(session) as work:
            yield work


def percentile(values: list[float], q: float) -> float:
    """Linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Figure:
    p50_ms: float
    p99_ms: float
    note: str = ""
    errors: int = 0


@dataclass
class Paths:
    """Every path the bench times, each called in one place: where a signature changes,
    this is what changes with it."""

    sandbox: Sandbox
    settings: Settings
    storage: Storage
    client: TestClient
    batch_id: str
    first_ids: list[str] = field(default_factory=list)

    def choice(self) -> BatchChoice:
        worker = Services(self.settings, self.sandbox.scope, self.storage, InProcessQueue())
        return BatchChoice(worker, MODEL, "bench-worker")

    def claim_first(self) -> str:
        first = self.first_ids.pop() if self.first_ids else None
        claims = self.choice().claim(first_id=first)
        mine = any(claim.job.id == first for claim in claims)
        return f"{len(claims)} jobs, the message's job {'among them' if mine else 'NOT among them'}"

    def claim_plain(self) -> str:
        return f"{len(self.choice().claim())} jobs"

    def stragglers(self) -> str:
        self.choice().wait_for_stragglers()
        return ""

    def maintenance(self) -> str:
        queue = InProcessQueue()
        run_pass(self.sandbox.scope, self.storage, queue, self.settings)
        return f"{len(queue.published)} published"

    def done_check(self) -> str:
        batches.finalize_if_done(self.sandbox.scope, self.storage, self.settings, [self.batch_id])
        return ""

    def max_cost_check(self) -> str:
        with self.sandbox.scope() as session:
            stopped = enforce_max_cost(session, [self.batch_id])
        return "stopped!" if stopped else ""

    def batch_get(self) -> str:
        answer = self.client.get(f"/v1/batches/{self.batch_id}")
        answer.raise_for_status()
        counts = answer.json()["request_counts"]
        return f"{answer.json()['status']}, {counts['completed']}/{counts['total']} completed"

    def batch_list(self) -> str:
        answer = self.client.get("/v1/batches", params={"limit": 100})
        answer.raise_for_status()
        return f"{len(answer.json()['data'])} batches"


# name, label, whether it writes (then each run is rolled back)
PATHS: list[tuple[str, str, bool]] = [
    ("claim", "claim, the message's job first", True),
    ("claim_plain", "claim, no first job", True),
    ("stragglers", "straggler check, full queue", True),
    ("maintenance", "maintenance pass", True),
    ("done_check", "done check, 50k batch", True),
    ("max_cost_check", "max_cost check, 50k batch", True),
    ("batch_get", "GET /v1/batches/{id}, 50k", False),
    ("batch_list", "GET /v1/batches?limit=100", False),
]


def action_of(paths: Paths, name: str) -> Callable[[], str]:
    actions: dict[str, Callable[[], str]] = {
        "claim": paths.claim_first,
        "claim_plain": paths.claim_plain,
        "stragglers": paths.stragglers,
        "maintenance": paths.maintenance,
        "done_check": paths.done_check,
        "max_cost_check": paths.max_cost_check,
        "batch_get": paths.batch_get,
        "batch_list": paths.batch_list,
    }
    return actions[name]


class LoggedErrors(logging.Handler):
    """Errors the code logs rather than raises (a maintenance pass logs its failures and
    goes on): a path that failed so must not pass for a fast one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)

    def reset(self) -> None:
        self.count, self.first = 0, None


ERRORS = LoggedErrors()


def measure(sandbox: Sandbox, action: Callable[[], str], reps: int, rolled_back: bool) -> Figure:
    samples = []
    note = ""
    ERRORS.reset()
    for n in range(WARMUP + reps):
        if rolled_back:
            with sandbox.run():
                started = time.perf_counter()
                note = action()
                elapsed = time.perf_counter() - started
        else:
            started = time.perf_counter()
            note = action()
            elapsed = time.perf_counter() - started
        if n >= WARMUP:
            samples.append(elapsed * 1000)
    if ERRORS.count:
        note += f"; {ERRORS.count} ERRORS LOGGED" if note else f"{ERRORS.count} ERRORS LOGGED"
        print(f"  the first error logged:\n{ERRORS.first}", flush=True)
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    return Figure(round(p50, 2), round(p99, 2), note, ERRORS.count)


def show(label: str, figure: Figure) -> None:
    note = f"  ({figure.note})" if figure.note else ""
    print(
        f"  {label:<32} p50 {figure.p50_ms:9.2f} ms   p99 {figure.p99_ms:9.2f} ms{note}",
        flush=True,
    )


# --- the plans ---------------------------------------------------------------------------


class Statements:
    """The SQL the engine runs while on: what each path asks of Postgres, to explain."""

    def __init__(self, engine: Engine) -> None:
        self.on = False
        self.seen: dict[str, Any] = {}
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        words = statement.lstrip().split(None, 1)
        verb = words[0].upper() if words else ""
        if (
            self.on
            and not executemany
            and verb in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")
            and " jobs" in statement
            # One plan a statement: for the bench's model's values where it runs for several.
            and (
                statement not in self.seen
                or (MODEL in str(parameters) and MODEL not in str(self.seen[statement]))
            )
        ):
            self.seen[statement] = parameters

    @contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        self.seen = {}
        self.on = True
        try:
            yield self.seen
        finally:
            self.on = False


def explain_paths(engine: Engine, paths: Paths, statements: Statements) -> dict[str, int]:
    """Each path run once with its SQL recorded, then each statement explained; returns,
    per path, how many of its plans read the jobs table whole."""
    scans: dict[str, int] = {}
    print("plans (EXPLAIN) at this size, for each path's statements on jobs:", flush=True)
    for name, label, rolled_back in PATHS:
        with statements.recording() as seen:
            if rolled_back:
                with paths.sandbox.run():
                    action_of(paths, name)()
            else:
                action_of(paths, name)()
        found = dict(seen)
        scans[name] = 0
        print(f"- {label}: {len(found)} distinct statements on jobs")
        with engine.connect() as conn:
            for statement, parameters in found.items():
                short = " ".join(statement.split())
                short = short if len(short) <= 150 else short[:147] + "..."
                try:
                    plan = [
                        str(row[0])
                        for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters)
                    ]
                except Exception as exc:  # noqa: BLE001 - a plan is information only
                    conn.rollback()
                    plan = [f"(no plan: {type(exc).__name__}: {str(exc).splitlines()[0]})"]
                full = any("Seq Scan on jobs" in line for line in plan)
                scans[name] += full
                print(f"    {'SEQ SCAN  ' if full else ''}{short}")
                for line in plan:
                    print(f"        {line if len(line) <= 160 else line[:157] + '...'}")
            conn.rollback()
    print(flush=True)
    return scans


# --- the run -----------------------------------------------------------------------------


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def commit_cost_ms(engine: Engine) -> float:
    """What a real commit of one small write costs here; the runs' commits are savepoints."""
    samples = []
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMPORARY TABLE bench_commit (x int)")
        conn.commit()
        for _ in range(30):
            started = time.perf_counter()
            conn.exec_driver_sql("INSERT INTO bench_commit VALUES (1)")
            conn.commit()
            samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="queued jobs, comma-separated")
    parser.add_argument("--reps", type=int, default=40, help="timed runs of each path")
    parser.add_argument("--batch-lines", type=int, default=BATCH_LINES)
    parser.add_argument("--small-batches", type=int, default=SMALL_BATCHES)
    parser.add_argument("--no-explain", action="store_true", help="print no plans")
    args = parser.parse_args()
    sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < TEMPLATES or args.reps < 1:
        parser.error(f"sizes of at least {TEMPLATES} jobs, and at least one rep")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # What the code logs as an error is counted against the path that logged it, and the
    # first one shown, rather than a traceback for each run.
    logging.getLogger().handlers = [ERRORS]

    name = services.create_database()
    url = services.database_url(name)
    try:
        with tempfile.TemporaryDirectory(prefix="queue-scale-") as tmp:
            result = run(url, Path(tmp), sizes, args)
    finally:
        get_engine(url).dispose()
        services.drop_database(name)
    print(json.dumps(result))


def run(url: str, root: Path, sizes: list[int], args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    upgrade(url, quiet=True)
    engine = get_engine(url)
    settings = make_settings(url, root / "storage")
    storage = LocalStorage(root / "storage")
    scope: Scope = functools.partial(session_scope, url)
    with scope() as session:
        key = create_key(session, OWNER)
    print(f"a real commit here: {commit_cost_ms(engine)} ms (the runs' commits are savepoints)")

    # The batches first (the 50k one last: the newest, on the list's page), then the jobs.
    made = time.perf_counter()
    small = [
        make_batch(scope, storage, settings, 2, seed=1000 + n) for n in range(args.small_batches)
    ]
    mark_succeeded(engine, small)
    for batch_id in small:
        batches.finalize(scope, storage, settings, batch_id)
    ended = sum(batch_status(engine, b) == "completed" for b in small)
    print(
        f"{len(small)} small batches of 2 lines, {ended} completed:"
        f" {time.perf_counter() - made:.1f} s",
        flush=True,
    )
    made = time.perf_counter()
    batch_id = make_batch(
        scope, storage, settings, args.batch_lines, seed=0, max_cost=Decimal(1_000_000)
    )
    validated = time.perf_counter() - made
    done = mark_succeeded(engine, [batch_id], args.batch_lines // 2)
    print(
        f"batch of {args.batch_lines} lines validated in {validated:.1f} s"
        f" ({batch_status(engine, batch_id)}); {done} lines marked succeeded",
        flush=True,
    )
    since = datetime.now().astimezone() - SPREAD_START
    templates = submit_templates(scope, settings, TEMPLATES)
    if ERRORS.count:
        print(f"{ERRORS.count} errors logged while filling; the first:\n{ERRORS.first}")

    statements = Statements(engine)
    by_size: dict[str, dict[str, Figure]] = {}
    scans: dict[str, int] | None = None
    have = TEMPLATES
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        paths = Paths(Sandbox(engine), settings, storage, client, batch_id)
        for n in sizes:
            filled = time.perf_counter()
            # The templates are jobs of the queue too: copies number 0 to n - TEMPLATES.
            for start in range(have - TEMPLATES, n - TEMPLATES, 100_000):
                end = min(start + 100_000, n - TEMPLATES)
                copy_jobs(engine, templates, start, end, since)
            have = n
            vacuum_analyze(engine)
            queued, of_batches = queued_count(engine)
            print(
                f"\n{size_label(n)}: {queued - of_batches} queued jobs + {of_batches} queued lines"
                f" of batches; jobs table {jobs_size_mb(engine):.0f} MB;"
                f" filled in {time.perf_counter() - filled:.1f} s",
                flush=True,
            )
            figures: dict[str, Figure] = {}
            for path, label, rolled_back in PATHS:
                if path == "claim":
                    paths.first_ids = sample_queued(engine, WARMUP + args.reps)
                figures[path] = measure(
                    paths.sandbox, action_of(paths, path), args.reps, rolled_back
                )
                show(label, figures[path])
            by_size[size_label(n)] = figures
            if n == sizes[-1] and not args.no_explain:
                paths.first_ids = sample_queued(engine, 1)
                scans = explain_paths(engine, paths, statements)

        # The batch finished: its other lines end, it is finalized, and GET reads it again.
        rest = mark_succeeded(engine, [batch_id])
        made = time.perf_counter()
        finalized = batches.finalize(scope, storage, settings, batch_id)
        status = batch_status(engine, batch_id)
        print(
            f"the batch's other {rest} lines marked succeeded; finalize: {finalized}"
            f" ({status}) in {time.perf_counter() - made:.1f} s",
            flush=True,
        )
        finished = measure(paths.sandbox, paths.batch_get, args.reps, False)
        show(f"GET /v1/batches/{{id}}, 50k {status}", finished)

    largest, smallest = size_label(sizes[-1]), size_label(sizes[0])
    top = by_size[largest]
    result: dict[str, Any] = {
        "sizes": sizes,
        "reps": args.reps,
        "batch_lines": args.batch_lines,
    }
    for path, _, _ in PATHS:
        if path.startswith("batch_") or path.endswith("_check"):
            result[f"{path}_p50_ms"] = top[path].p50_ms
            result[f"{path}_p99_ms"] = top[path].p99_ms
        else:
            result[f"{path}_p50_ms_{largest}"] = top[path].p50_ms
            result[f"{path}_p99_ms_{largest}"] = top[path].p99_ms
    first = by_size[smallest]
    result["claim_growth"] = round(top["claim"].p50_ms / first["claim"].p50_ms, 2)
    result["claim_plain_growth"] = round(top["claim_plain"].p50_ms / first["claim_plain"].p50_ms, 2)
    result["claim_growth_of"] = f"{largest} over {smallest}"
    result["maintenance_published_per_pass"] = top["maintenance"].note
    result["batch_get_finished_status"] = status
    result["batch_get_finished_p50_ms"] = finished.p50_ms
    result["batch_get_finished_p99_ms"] = finished.p99_ms
    result["seq_scans_on_jobs"] = scans
    result["errors_logged"] = {
        f"{path}_{label}": figure.errors
        for label, figures in by_size.items()
        for path, figure in figures.items()
        if figure.errors
    }
    result["by_size"] = {
        label: {
            f"{path}_{stat}": getattr(figure, f"{stat}_ms")
            for path, figure in figures.items()
            for stat in ("p50", "p99")
        }
        for label, figures in by_size.items()
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


if __name__ == "__main__":
    main()
