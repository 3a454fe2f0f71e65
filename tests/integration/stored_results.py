"""Jobs that succeeded with their response kept in object storage, recorded through the same
claim and record path a worker takes."""

from jobs import queries
from jobs.db import get_session_factory
from jobs.queries import Outcome
from jobs.settings import Settings
from jobs.storage import Storage
from tests.factories import make_job
from worker.results import place_response


def succeeded_job(
    settings: Settings, storage: Storage, text: str, owner: str = "alice"
) -> tuple[str, str]:
    """A job of `owner`'s that succeeded with `text` as its response, kept in `storage` however
    short it is: the job's id and the response's storage key."""
    session = get_session_factory(settings.database_url)()
    try:
        job = make_job(session, settings, owner)
        [claim] = queries.claim_batch(session, job.model, "w", 60, 1, first_id=job.id)
        inline, key = place_response(storage, job.id, text, inline_max_bytes=0)
        assert key is not None
        outcome = Outcome(3, "stop", inline, key, 0, 0, 0.1)  # type: ignore[arg-type]
        assert queries.record_success(session, claim, outcome)
        return job.id, key
    finally:
        session.close()
