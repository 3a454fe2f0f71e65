"""Where responses are kept, against real Postgres and a storage folder."""

from pathlib import Path

from sqlalchemy.orm import Session

from jobs import queries
from jobs.db import get_session_factory
from jobs.queries import Outcome
from jobs.schemas.jobs import job_public
from jobs.settings import Settings
from jobs.storage import LocalStorage
from tests.factories import make_job
from worker.results import place_response


def record(session: Session, settings: Settings, storage: LocalStorage, text: str) -> str:
    job = make_job(session, settings)
    [claim] = queries.claim_batch(session, job.model, "w", 60, 1, first_id=job.id)
    inline, uri = place_response(storage, job.id, text, inline_max_bytes=64)
    outcome = Outcome(len(text), "length", inline, uri, 0, 0, 0.1)  # type: ignore[arg-type]
    assert queries.record_success(session, claim, outcome)
    session.refresh(job)
    public = job_public(job, storage)
    assert public.result is not None
    return public.result.response


def test_small_text_stays_in_the_row_large_and_nul_text_go_to_storage(
    api_settings: Settings, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    session = get_session_factory(api_settings.database_url)()
    try:
        assert record(session, api_settings, storage, "short answer") == "short answer"
        large = "word " * 100
        assert record(session, api_settings, storage, large) == large
        with_nul = "a\x00b"
        assert record(session, api_settings, storage, with_nul) == with_nul
        assert len(list((tmp_path / "results").iterdir())) == 2
    finally:
        session.close()
