"""A worker's batch refilled from the queue as its rows finish, against real Postgres."""

from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.models import JobStatus
from jobs.queue import InProcessQueue
from jobs.settings import Settings
from jobs.storage import LocalStorage
from tests.factories import make_job
from worker.engine.loader import LoadedModel
from worker.runtime import WorkerRuntime

MODEL = "tiny-random-mistral"


def runtime(settings: Settings, loaded: LoadedModel, tmp_path: Path) -> WorkerRuntime:
    return WorkerRuntime(
        settings,
        loaded,
        lambda: session_scope(settings.database_url),
        LocalStorage(tmp_path),
        InProcessQueue(),
        "refill-test-worker",
    )


@pytest.mark.parametrize("refill", [True, False])
def test_a_batch_claims_queued_jobs_as_its_rows_finish(
    db: Session, api_settings: Settings, loaded: LoadedModel, tmp_path: Path, refill: bool
) -> None:
    settings = api_settings.model_copy(
        update={"max_batch_size": 2, "batch_wait_ms": 0, "refill": refill}
    )
    lengths = [12, 2, 3, 4, 2, 5]
    jobs = [
        make_job(db, settings, prompt=f"Count to {n}", max_tokens=n, temperature=0) for n in lengths
    ]
    worker = runtime(settings, loaded, tmp_path)
    recorded = worker.handle_message(jobs[0].id)
    for job in jobs:
        db.refresh(job)
    succeeded = [job for job in jobs if job.status == JobStatus.succeeded]
    if refill:
        # One batch of two slots ran them all, each claimed once.
        assert recorded == len(jobs) and len(succeeded) == len(jobs)
        assert all(job.attempts == 1 and job.claimed_by == "refill-test-worker" for job in jobs)
        assert [job.completion_tokens for job in jobs] == lengths
    else:
        assert recorded == 2 and len(succeeded) == 2  # the claimed batch alone
        assert sum(job.status == JobStatus.queued for job in jobs) == len(jobs) - 2
