"""The jobs' maintenance pass: claims whose lease lapsed are given back (or failed past
`max_attempts`), scheduled jobs that are due are started, and queued jobs whose broker message
may have been lost are published again, so that jobs keep moving whatever happened to workers
and the broker.
"""

import logging

from sqlalchemy.orm import Session

from jobs import queries
from jobs.queue import JobQueue
from jobs.registry import resolve_model
from jobs.settings import Settings

log = logging.getLogger(__name__)


def maintain(session: Session, queue: JobQueue, settings: Settings) -> int:
    """Give back expired claims, start due scheduled jobs, and wake each model's workers
    for its queued jobs that have no live message. Returns how many messages it published.

    The rule is `queries.due_for_publish`'s: a message for each batch's worth
    (`max_batch_size`) of queued jobs never published or published more than
    `requeue_after_seconds` ago, at most `queries.MESSAGES_PER_MODEL` a model a pass. A
    message only wakes a worker, which claims a whole batch of what is queued, so more would
    only pile up in the broker. Jobs given back here are unpublished, and come first.
    """
    queries.release_expired(session, settings.max_attempts)
    wakes = queries.due_for_publish(
        session, settings.requeue_after_seconds, settings.max_batch_size
    )
    for sent, wake in enumerate(wakes):
        try:
            queue.publish(wake.job_id, resolve_model(wake.model).queue)
        except Exception:  # the broker is down: the rest waits for the next pass
            log.exception("could not publish job %s; the next pass tries again", wake.job_id)
            queries.forget_enqueued(session, [i for w in wakes[sent:] for i in w.covers])
            return sent
    return len(wakes)
