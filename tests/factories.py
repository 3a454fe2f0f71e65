"""Jobs made through our own submission path."""

from typing import Any

from sqlalchemy.orm import Session

from jobs import service
from jobs.models import Job
from jobs.queue import InProcessQueue
from jobs.schemas.native import JobCreate
from jobs.settings import Settings


def make_job(session: Session, settings: Settings, owner: str = "alice", **body: Any) -> Job:
    request = JobCreate.model_validate({"prompt": "Hello", "max_tokens": 4, **body})
    prepared = service.prepare_native(request, settings)
    job, _ = service.submit_job(session, InProcessQueue(), owner, prepared)
    return job
