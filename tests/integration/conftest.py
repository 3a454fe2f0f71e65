from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from jobs.db import get_engine, get_session_factory
from jobs.keys import create_key
from jobs.models import Job, JobStatus
from jobs.registry import resolve_model
from jobs.settings import Settings
from migrations.runner import upgrade
from tests import services
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def api_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A database and a Redis database of their own, with no worker on them: jobs accepted
    here stay queued, so validation tests never start a decode."""
    name = services.create_database()
    url = services.database_url(name)
    upgrade(url)
    yield Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        broker_url=services.redis_url(),
        storage_url=f"file://{tmp_path_factory.mktemp('storage')}",
        model="tiny-random-mistral",
        max_request_bytes=1024 * 1024,
    )
    get_engine(url).dispose()
    services.drop_database(name)


@pytest.fixture(scope="session")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def session(api_settings: Settings) -> Iterator[Session]:
    db = get_session_factory(api_settings.database_url)()
    yield db
    db.close()


@pytest.fixture
def db(session: Session) -> Session:
    """A session on a queue with no unfinished job: earlier tests leave theirs in this
    database, and claims would take them."""
    unfinished = (JobStatus.queued, JobStatus.running, JobStatus.scheduled)
    session.query(Job).filter(Job.status.in_(unfinished)).update({"status": JobStatus.cancelled})
    session.commit()
    return session


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    """The tiny model, loaded as a worker loads it, once per test module."""
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def make_key(settings: Settings, owner: str) -> str:
    db = get_session_factory(settings.database_url)()
    try:
        secret = create_key(db, owner)
        db.commit()
        return secret
    finally:
        db.close()


@pytest.fixture(scope="session")
def alice(api_settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(api_settings, 'alice')}"}


@pytest.fixture(scope="session")
def bob(api_settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(api_settings, 'bob')}"}
