"""Retention against the real database and storage: jobs, batches and files on both sides of
MBATCH_RETENTION_DAYS (made through the real paths, then aged by SQL), of which the pass
deletes exactly those past the limit with their stored objects, in bounded chunks, and never
unfinished work: not a queued job, not the lines of a batch still running."""

import json
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import batches, queries
from jobs.db import session_scope
from jobs.files import storage_key
from jobs.maintenance import purge
from jobs.models import Batch, BatchStatus, FileObject, Job, LineError
from jobs.queries import Outcome
from jobs.settings import Settings
from jobs.storage import LocalStorage, Storage, storage_from_settings
from tests.factories import make_job
from tests.integration.stored_results import succeeded_job
from tests.integration.test_batch_steps import CHAT, chat_line, upload
from worker.results import place_response

KINDS = ("jobs", "line_errors", "batches", "files")


@pytest.fixture(scope="module")
def storage(api_settings: Settings) -> Storage:
    return storage_from_settings(api_settings)


def line(custom_id: str) -> bytes:
    return json.dumps(chat_line(custom_id)).encode()


def start_batch(client: TestClient, headers: dict[str, str], lines: list[bytes]) -> str:
    body = {"input_file_id": upload(client, headers, lines), "endpoint": CHAT}
    made = client.post("/v1/batches", json=body, headers=headers)
    assert made.status_code == 200, made.text
    batch_id: str = made.json()["id"]
    shown = client.get(f"/v1/batches/{batch_id}", headers=headers).json()
    assert shown["status"] == "in_progress", shown  # validated after the answer
    return batch_id


def run_line(settings: Settings, storage: Storage, job_id: str, answer: str | None) -> str | None:
    """Run a job as a worker does: it succeeds with `answer` kept in storage (its key is
    returned), or fails when there is none."""
    with session_scope(settings.database_url) as session:
        [claim] = queries.claim_batch(session, settings.model, "w", 60, 1, first_id=job_id)
        assert claim.job.id == job_id
        if answer is None:
            assert queries.record_failure(session, claim, "engine_error", "it broke")
            return None
        _, key = place_response(storage, job_id, answer, inline_max_bytes=0)
        outcome = Outcome(2, "stop", None, key, Decimal(0), Decimal(0), 0.1)
        assert queries.record_success(session, claim, outcome)
        return key


def age(
    settings: Settings,
    days: int,
    jobs: Iterable[str] = (),
    batches: Iterable[str] = (),
    files: Iterable[str] = (),
) -> None:
    """Move every time of these rows `days` days back, as if they were that old."""
    back = timedelta(days=days)
    job_times = (Job.created_at, Job.enqueued_at, Job.started_at, Job.finished_at)
    batch_times = (
        Batch.created_at,
        Batch.in_progress_at,
        Batch.finalizing_at,
        Batch.completed_at,
        Batch.failed_at,
        Batch.cancelling_at,
        Batch.cancelled_at,
    )
    with session_scope(settings.database_url) as session:
        for model, ids, times in (
            (Job, jobs, job_times),
            (Batch, batches, batch_times),
            (FileObject, files, (FileObject.created_at,)),
        ):
            session.execute(
                update(model)
                .where(model.id.in_(list(ids)))  # type: ignore[attr-defined]
                .values({column: column - back for column in times})
            )


class Finished:
    """A batch whose lines all ran (the first succeeded, with its result in storage, the
    second failed) and whose third line was refused, finalized into its output and error
    files."""

    def __init__(
        self, client: TestClient, headers: dict[str, str], settings: Settings, storage: Storage
    ) -> None:
        self.id = start_batch(client, headers, [line("a"), line("b"), b"not json"])
        self.jobs = [batches.line_job_id(self.id, n) for n in (1, 2)]
        key = run_line(settings, storage, self.jobs[0], "an answer")
        run_line(settings, storage, self.jobs[1], None)
        assert batches.finalize(
            lambda: session_scope(settings.database_url), storage, settings, self.id
        )
        with session_scope(settings.database_url) as session:
            batch = session.get(Batch, self.id)
            assert batch is not None and batch.status == BatchStatus.completed
            assert batch.output_file_id is not None and batch.error_file_id is not None
            self.files = [batch.input_file_id, batch.output_file_id, batch.error_file_id]
            stored = session.scalars(
                select(FileObject.storage_key).where(FileObject.id.in_(self.files))
            ).all()
            assert len(stored) == 3
        assert key is not None
        self.keys = [key, *stored]
        self.line_errors = {(self.id, 3)}

    def age(self, settings: Settings, days: int) -> None:
        age(settings, days, jobs=self.jobs, batches=[self.id], files=self.files)


def scope_of(settings: Settings) -> Any:
    def scope() -> AbstractContextManager[Session]:
        return session_scope(settings.database_url)

    return scope


def existing(
    settings: Settings,
    storage: Storage,
    jobs: set[str],
    batch_ids: set[str],
    files: set[str],
    keys: set[str],
) -> dict[str, set[Any]]:
    """Which of these rows and stored objects are still there."""
    with session_scope(settings.database_url) as session:
        return {
            "jobs": set(session.scalars(select(Job.id).where(Job.id.in_(jobs)))),
            "batches": set(session.scalars(select(Batch.id).where(Batch.id.in_(batch_ids)))),
            "line_errors": {
                (batch_id, line)
                for batch_id, line in session.execute(
                    select(LineError.batch_id, LineError.line).where(
                        LineError.batch_id.in_(batch_ids)
                    )
                )
            },
            "files": set(session.scalars(select(FileObject.id).where(FileObject.id.in_(files)))),
            "objects": {key for key in keys if storage.exists(key)},
        }


@pytest.fixture
def cleanup(api_settings: Settings) -> Iterator[list[str]]:
    """Jobs and batches this test leaves unfinished, cancelled afterwards so that they stay
    out of other tests' claims."""
    unfinished: list[str] = []
    yield unfinished
    with session_scope(api_settings.database_url) as session:
        for id_ in unfinished:
            if (batch := session.get(Batch, id_)) is not None:
                batches.cancel_batch(session, batch)
            elif (job := session.get(Job, id_)) is not None:
                queries.cancel(session, job)


def test_retention_deletes_what_is_past_the_limit_and_nothing_else(
    client: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    storage: Storage,
    cleanup: list[str],
) -> None:
    settings = api_settings
    assert settings.retention_days == 30
    # Jobs of their own: two that succeeded with their results in storage, on both sides of
    # the limit; one cancelled past it; one queued for longer than the limit.
    old_job, old_key = succeeded_job(settings, storage, "old answer")
    recent_job, recent_key = succeeded_job(settings, storage, "recent answer")
    # The old job's second sample (n = 2) was kept in storage too: it goes with the job.
    sample_key = f"results/{old_job}.1.txt"
    storage.put_bytes(sample_key, b"old second answer")
    with session_scope(settings.database_url) as session:
        choice = {"uri": sample_key, "finish_reason": "length", "completion_tokens": 3}
        session.execute(update(Job).where(Job.id == old_job).values(choices=[choice]))
    with session_scope(settings.database_url) as session:
        cancelled = queries.cancel(session, make_job(session, settings)).id
        queued = make_job(session, settings).id
    cleanup.append(queued)
    age(settings, 31, jobs=[old_job, cancelled])
    age(settings, 29, jobs=[recent_job])
    age(settings, 40, jobs=[queued])

    # A batch still running, begun long ago: its first line ended long ago, its second waits.
    running = start_batch(client, alice, [line("x"), line("y")])
    cleanup.append(running)
    running_jobs = [batches.line_job_id(running, n) for n in (1, 2)]
    running_key = run_line(settings, storage, running_jobs[0], "an early answer")
    assert running_key is not None
    with session_scope(settings.database_url) as session:
        running_row = session.get(Batch, running)
        assert running_row is not None
        running_file = running_row.input_file_id
        running_file_key = storage_key(running_file)
    age(settings, 40, jobs=running_jobs, batches=[running], files=[running_file])

    # Finished batches with their files, on both sides of the limit, and an input file that
    # no batch read.
    old_batch = Finished(client, alice, settings, storage)
    old_batch.age(settings, 31)
    recent_batch = Finished(client, alice, settings, storage)
    recent_batch.age(settings, 29)
    # Its lines ended before the limit, yet they stay as long as their batch does.
    age(settings, 2, jobs=recent_batch.jobs)
    unused_file = upload(client, alice, [line("z")])
    age(settings, 31, files=[unused_file])

    everything: dict[str, set[Any]] = {
        "jobs": {old_job, recent_job, cancelled, queued, *running_jobs}
        | {*old_batch.jobs, *recent_batch.jobs},
        "batches": {running, old_batch.id, recent_batch.id},
        "line_errors": old_batch.line_errors | recent_batch.line_errors,
        "files": {running_file, unused_file, *old_batch.files, *recent_batch.files},
        "objects": {old_key, sample_key, recent_key, running_key, running_file_key}
        | {*old_batch.keys, *recent_batch.keys, storage_key(unused_file)},
    }
    kept = {
        "jobs": {recent_job, queued, *running_jobs, *recent_batch.jobs},
        "batches": {running, recent_batch.id},
        "line_errors": recent_batch.line_errors,
        "files": {running_file, *recent_batch.files},
        "objects": {recent_key, running_key, running_file_key, *recent_batch.keys},
    }

    def now_there() -> dict[str, set[Any]]:
        return existing(
            settings,
            storage,
            everything["jobs"],
            everything["batches"],
            everything["files"],
            everything["objects"],
        )

    assert now_there() == everything  # all made and stored

    # A pass takes at most its chunks: one row of each kind here. The batch waits for its
    # lines and line errors to go first.
    scope = scope_of(settings)
    first = purge(scope, storage, settings, chunk_rows=1, max_chunks=1)
    assert {kind: first[kind] for kind in KINDS} == {
        "jobs": 1,
        "line_errors": 1,
        "batches": 0,
        "files": 1,
    }
    after_first = now_there()
    assert len(everything["jobs"] - after_first["jobs"]) == 1
    assert old_batch.id in after_first["batches"]

    passes = 1
    while purge(scope, storage, settings, chunk_rows=1, max_chunks=1):
        passes += 1
        assert passes < 20
    assert passes >= 4  # four old jobs, one at a time

    assert now_there() == kept
    assert not purge(scope, storage, settings)  # nothing more to delete


def test_a_storage_outage_deletes_no_row(
    api_settings: Settings, storage: Storage, tmp_path: Path
) -> None:
    settings = api_settings
    job, key = succeeded_job(settings, storage, "an answer")
    age(settings, 31, jobs=[job])
    down = LocalStorage(tmp_path / "storage")
    down.root.rmdir()  # the storage folder is gone: storage is unavailable
    scope = scope_of(settings)

    assert not purge(scope, down, settings)
    assert existing(settings, storage, {job}, set(), set(), {key}) == {
        "jobs": {job},
        "batches": set(),
        "line_errors": set(),
        "files": set(),
        "objects": {key},
    }

    assert purge(scope, storage, settings)["jobs"] == 1
    assert existing(settings, storage, {job}, set(), set(), {key})["jobs"] == set()
    assert not storage.exists(key)
