"""The periodic pass that keeps jobs moving whatever happened to workers and the broker."""

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from jobs import batches, queries
from jobs.queue import JobQueue
from jobs.service import publish
from jobs.settings import Settings
from jobs.storage import Storage

log = logging.getLogger(__name__)


def maintain(session: Session, queue: JobQueue, settings: Settings) -> int:
    """Give back expired claims, start due scheduled jobs, publish queued jobs whose message
    may be lost. Returns how many messages it published."""
    requeued = queries.release_expired(session, settings.max_attempts)
    due = queries.due_for_publish(session, settings.requeue_after_seconds)
    jobs = {job.id: job for job in requeued + due}
    publish(session, queue, list(jobs.values()))
    return len(jobs)


def run_pass(
    scope: Callable[[], AbstractContextManager[Session]],
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
) -> None:
    """One maintenance pass, as workers and `mbatch beat` run it: jobs first, then batches.
    Each part runs whatever happened to the other, so a failure in one never stops both."""
    try:
        with scope() as session:
            published = maintain(session, queue, settings)
        if published:
            log.info("published %d jobs", published)
    except Exception:
        log.exception("the jobs' maintenance pass failed; the batches' runs anyway")
    batches.advance(scope, storage, queue, settings)


def repeat(interval: float, action: Callable[[], None], name: str, stop: threading.Event) -> None:
    """Run `action` every `interval` seconds until `stop` is set; a failed pass is logged and
    the next one comes on time."""
    while not stop.is_set():
        try:
            action()
        except Exception:
            log.exception("%s pass failed; trying again", name)
        stop.wait(interval)
