"""Faults of the services around the workers, on real processes: a Redis that dies and comes
back empty, an S3 server that dies and comes back. Each test has a stack of its own (API,
worker, Redis, database), so that no other test's worker claims its jobs, and ends with every
job succeeded and recorded once, as Postgres counts it."""

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest

from tests import services
from tests.conftest import BUCKET, Stack, create_key, service_env

# Every change of a job's status or finish time, written by Postgres itself as it happens:
# the tests count recorded results here, not in what the processes say they did.
AUDIT_SQL = """
CREATE TABLE job_transitions (
    id bigserial PRIMARY KEY,
    job_id text NOT NULL,
    old_status text NOT NULL,
    new_status text NOT NULL,
    attempts integer NOT NULL,
    finished_at timestamptz
);
CREATE FUNCTION audit_job_transition() RETURNS trigger AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status
            OR NEW.finished_at IS DISTINCT FROM OLD.finished_at THEN
        INSERT INTO job_transitions (job_id, old_status, new_status, attempts, finished_at)
        VALUES (NEW.id, OLD.status, NEW.status, NEW.attempts, NEW.finished_at);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER audit_job_transition AFTER UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION audit_job_transition();
"""

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def plain_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def own_database() -> Iterator[str]:
    """A database of the test's own, with the audit trigger on its jobs."""
    from migrations.runner import upgrade

    name = services.create_database()
    url = services.database_url(name)
    upgrade(url, quiet=True)
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute(AUDIT_SQL)  # type: ignore[arg-type]
    yield url
    services.drop_database(name)


@pytest.fixture
def processes() -> Iterator[list[services.Process]]:
    """What a test starts, stopped however the test ends, the last started first."""
    started: list[services.Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def fault_env(
    database_url: str, broker_url: str, s3_url: str, models_dir: Path, **extra: str
) -> dict[str, str]:
    return {
        **service_env(database_url, broker_url, s3_url, models_dir),
        **S3_ENV,
        # No worker dies here: a lease that cannot lapse on a busy machine keeps every claim
        # beyond the first down to the fault under test.
        "MBATCH_LEASE_SECONDS": "60",
        "MBATCH_MAINTENANCE_INTERVAL_SECONDS": "1",
        # Messages lost with the broker are published again by maintenance after this long.
        "MBATCH_REQUEUE_AFTER_SECONDS": "3",
        # Several batches, so that a fault finds jobs running, queued and not yet submitted.
        "MBATCH_MAX_BATCH_SIZE": "8",
        "MBATCH_BATCH_WAIT_MS": "200",
        # Every result goes to object storage: recording one needs S3.
        "MBATCH_RESULT_INLINE_MAX_BYTES": "1",
        **extra,
    }


def start_stack(env: dict[str, str], log_dir: Path, processes: list[services.Process]) -> Stack:
    api, api_url = services.start_api(env, log_dir)
    processes.append(api)
    worker = services.start_worker(env, log_dir)
    processes.append(worker)
    return Stack(env, log_dir, api, api_url, worker)


def submit(stack: Stack, key: dict[str, str], count: int, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        # Long enough that a fault lands mid-decode; a seed per job, as a client would send.
        body = {"prompt": f"{tag} {i}: tell a story", "max_tokens": 32 + i % 9, "seed": i + 1}
        response = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=key, timeout=30)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def statuses(database_url: str) -> dict[str, str]:
    with psycopg.connect(plain_url(database_url)) as conn:
        return dict(conn.execute("SELECT id, status FROM jobs").fetchall())


def transitions(database_url: str) -> list[tuple[str, str, str, int]]:
    with psycopg.connect(plain_url(database_url)) as conn:
        return conn.execute(
            "SELECT job_id, old_status, new_status, attempts FROM job_transitions ORDER BY id"
        ).fetchall()


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Like services.wait_for, but an assertion failing in `check` ends the wait at once."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def wait_until_running(database_url: str) -> None:
    services.wait_for(
        lambda: "running" in statuses(database_url).values(), 60, "a batch to start", 0.02
    )


def wait_until_all_succeeded(database_url: str, ids: list[str], timeout: float) -> None:
    def done() -> bool:
        found = statuses(database_url)
        ended = {
            job_id: found[job_id] for job_id in ids if found[job_id] in ("failed", "cancelled")
        }
        assert not ended, f"jobs ended otherwise: {ended}"
        return all(found[job_id] == "succeeded" for job_id in ids)

    poll(done, timeout, "every job to succeed")


def assert_each_recorded_once(database_url: str, ids: list[str]) -> dict[str, list[Any]]:
    """Every job succeeded by exactly one recorded result, and nothing touched it after;
    returns each job's transitions."""
    by_job: dict[str, list[Any]] = {job_id: [] for job_id in ids}
    for job_id, old, new, attempts in transitions(database_url):
        by_job[job_id].append((old, new, attempts))
    with psycopg.connect(plain_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT id, status, attempts, started_at, finished_at, response_uri, claim_token"
            " FROM jobs"
        ).fetchall()
    assert {row[0] for row in rows} == set(ids)
    for job_id, status, attempts, started_at, finished_at, uri, claim_token in rows:
        moves = by_job[job_id]
        recorded = [move for move in moves if move[1] == "succeeded"]
        assert len(recorded) == 1, (job_id, moves)
        assert moves[-1] == recorded[0], f"{job_id} changed after its result: {moves}"
        claims = [move for move in moves if move[1] == "running"]
        assert recorded[0][0] == "running" and recorded[0][2] == attempts, (job_id, moves)
        assert status == "succeeded" and claim_token is None
        assert 1 <= attempts <= len(claims), (job_id, attempts, moves)
        assert started_at <= finished_at
        assert uri == f"results/{job_id}.txt"
    return by_job


def result_writes(*moto_logs: Path) -> Counter[str]:
    """How many times each job's result was stored, from the S3 servers' request logs."""
    stored = re.compile(
        rf'"(?:\x1b\[\d+m)?PUT /{BUCKET}/data/results/(job_\w+)\.txt HTTP/[\d.]+(?:\x1b\[0m)?" 200 '
    )
    return Counter(
        match.group(1)
        for log in moto_logs
        for match in stored.finditer(log.read_text(errors="replace"))
    )


def test_a_redis_killed_and_restarted_empty_loses_no_job(
    own_database: str,
    models_dir: Path,
    s3_url: str,
    log_dir: Path,
    tmp_path: Path,
    processes: list[services.Process],
) -> None:
    """Its own Redis, API and worker; the session's S3 server, whose log is in `log_dir`."""
    database_url = own_database
    redis_server, broker_url = services.start_redis_server(tmp_path)
    processes.append(redis_server)
    port = int(broker_url.rsplit(":", 1)[1].split("/")[0])
    stack = start_stack(
        fault_env(database_url, broker_url, s3_url, models_dir), tmp_path, processes
    )
    key = {"Authorization": f"Bearer {create_key(stack.env, 'frank')}"}
    before = submit(stack, key, 20, "before")
    wait_until_running(database_url)
    redis_server.kill()  # mid-decode; the messages of the batches still to come go with it
    # Postgres takes a job while the broker is down; maintenance publishes it later.
    during = submit(stack, key, 1, "during")
    # Down until the worker has found out and failed to reconnect, so that it comes back
    # to a new, empty server through its own reconnect path.
    services.wait_for(
        lambda: "Cannot connect to redis" in stack.worker.output(), 60, "the worker to retry"
    )
    redis_server, _ = services.start_redis_server(tmp_path, port)
    processes.append(redis_server)
    after = submit(stack, key, 4, "after")

    ids = before + during + after
    wait_until_all_succeeded(database_url, ids, timeout=90)
    by_job = assert_each_recorded_once(database_url, ids)
    # No worker died: every job ran once, however many messages it took to get there.
    assert {job_id: len(moves) for job_id, moves in by_job.items()} == dict.fromkeys(ids, 2)
    assert stack.worker.alive(), "the worker did not outlive its broker"
    assert stack.worker.output().count("Connected to redis") >= 2
    # The API published the later jobs itself, on a connection of the new server.
    api_log = stack.api.output()
    assert not [job_id for job_id in after if f"could not publish job {job_id}" in api_log]
    writes = result_writes(log_dir / "moto.log")
    assert {job_id: writes[job_id] for job_id in ids} == dict.fromkeys(ids, 1)
    for job_id in ids[::5]:
        job = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}", headers=key).json()
        assert job["status"] == "succeeded" and job["result"]["response"], job


def test_an_s3_outage_gives_results_back_to_run_again(
    own_database: str, models_dir: Path, tmp_path: Path, processes: list[services.Process]
) -> None:
    """Its own S3 server, Redis, API and worker."""
    database_url, log_dir = own_database, tmp_path
    redis_server, broker_url = services.start_redis_server(log_dir)
    processes.append(redis_server)
    s3_server, s3_url = services.start_s3_server(log_dir, name="moto-1")
    processes.append(s3_server)
    port = int(s3_url.rsplit(":", 1)[1])
    max_attempts = 2
    env = fault_env(
        database_url,
        broker_url,
        s3_url,
        models_dir,
        # Fewer attempts than the outage lasts, to see that it spends none of them.
        MBATCH_MAX_ATTEMPTS=str(max_attempts),
        # Small batches: each result that cannot be stored waits out the S3 client's retries.
        MBATCH_MAX_BATCH_SIZE="4",
        # A result given back runs again soon: the outage is waited out within the test.
        MBATCH_OUTAGE_RETRY_SECONDS="0.5",
    )
    stack = start_stack(env, log_dir, processes)
    key = {"Authorization": f"Bearer {create_key(stack.env, 'grace')}"}
    ids = submit(stack, key, 16, "s3")
    wait_until_running(database_url)
    s3_server.kill()

    def given_back_enough() -> bool:
        """An outage longer than a job's attempts: one result given back that often."""
        moves = transitions(database_url)
        failed = [move for move in moves if move[2] == "failed"]
        assert not failed, f"jobs failed while storage was down: {failed}"
        backs = [move[0] for move in moves if move[1:3] == ("running", "scheduled")]
        return any(backs.count(job_id) >= max_attempts for job_id in set(backs))

    poll(given_back_enough, 60, "results to be given back")
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", **_credentials())
    s3_server, _ = services.start_s3_server(log_dir, port, name="moto-2")
    processes.append(s3_server)
    # The restarted server is empty; a real outage keeps the bucket (until it is made again,
    # a missing bucket is an outage too).
    restarted = time.time()
    s3.create_bucket(Bucket=BUCKET)

    wait_until_all_succeeded(database_url, ids, timeout=90)
    by_job = assert_each_recorded_once(database_url, ids)
    runs = {job_id: sum(m[1] == "running" for m in moves) for job_id, moves in by_job.items()}
    assert max(runs.values()) > max_attempts, runs  # it outlived its attempts, and succeeded
    with psycopg.connect(plain_url(database_url)) as conn:
        recorded_since = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM jobs WHERE finished_at > to_timestamp(%s)", (restarted,)
            )
        ]
    assert recorded_since
    # The first server's objects went with it; what was stored since is there, once.
    writes = result_writes(log_dir / "moto-1.log", log_dir / "moto-2.log")
    assert {job_id: writes[job_id] for job_id in recorded_since} == dict.fromkeys(recorded_since, 1)
    assert all(writes[job_id] <= 1 for job_id in ids), writes
    for job_id in recorded_since:
        body = s3.get_object(Bucket=BUCKET, Key=f"data/results/{job_id}.txt")["Body"].read()
        assert body.decode()


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }
