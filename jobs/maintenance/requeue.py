"""The jobs' maintenance pass: claims whose lease lapsed are given back (or failed past
`max_attempts`), scheduled jobs that are due are started, and queued jobs whose broker message
may have been lost are published again, so that jobs keep moving whatever happened to workers
and the broker.
"""

from sqlalchemy.orm import Session

from jobs import queries
from jobs.queue import JobQueue
from jobs.service import publish
from jobs.settings import Settings


def maintain(session: Session, queue: JobQueue, settings: Settings) -> int:
    """Give back expired claims, start due scheduled jobs, publish queued jobs whose message
    may be lost. Returns how many messages it published."""
    requeued = queries.release_expired(session, settings.max_attempts)
    due = queries.due_for_publish(session, settings.requeue_after_seconds)
    jobs = {job.id: job for job in requeued + due}
    publish(session, queue, list(jobs.values()))
    return len(jobs)
