"""The periodic pass that keeps jobs and batches moving whatever happened to workers and the
broker. `run_pass` is the one pass, which both the worker's maintenance thread and `mbatch beat`
run (`repeat` runs it on a timer): the jobs' part (`jobs.maintenance.requeue`), the batches'
part (`jobs.maintenance.batches`), due schedules (`jobs.schedules`), due webhook events
(`jobs.webhooks`) and then retention (`jobs.maintenance.retention`), each run whatever happened
to the others.
"""

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from jobs import schedules, webhooks
from jobs.maintenance.batches import advance, enforce_max_cost, expire_due
from jobs.maintenance.requeue import maintain
from jobs.maintenance.retention import purge
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage

__all__ = [
    "advance",
    "enforce_max_cost",
    "expire_due",
    "maintain",
    "purge",
    "repeat",
    "run_pass",
]

log = logging.getLogger(__name__)


def run_pass(
    scope: Callable[[], AbstractContextManager[Session]],
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
) -> None:
    """One maintenance pass, as workers and `mbatch beat` run it: jobs first, then batches,
    schedules, webhook events, and retention last. Each part runs whatever happened to the
    others: a failure is logged and never stops another part."""
    parts: tuple[tuple[str, Callable[[], object]], ...] = (
        ("jobs", lambda: _requeue(scope, queue, settings)),
        ("batches", lambda: advance(scope, storage, queue, settings)),
        ("schedules", lambda: schedules.fire_due(scope, storage, queue, settings)),
        ("webhooks", lambda: webhooks.publish_due(scope, queue, settings)),
        ("retention", lambda: _purge(scope, storage, settings)),
    )
    for name, part in parts:
        try:
            part()
        except Exception:
            log.exception("the %s part of the maintenance pass failed; the others run anyway", name)


def _requeue(
    scope: Callable[[], AbstractContextManager[Session]], queue: JobQueue, settings: Settings
) -> None:
    with scope() as session:
        published = maintain(session, queue, settings)
    if published:
        log.info("published %d messages", published)


def _purge(
    scope: Callable[[], AbstractContextManager[Session]], storage: Storage, settings: Settings
) -> None:
    deleted = purge(scope, storage, settings)
    if deleted:
        log.info("retention deleted %s", ", ".join(f"{n} {kind}" for kind, n in deleted.items()))


def repeat(interval: float, action: Callable[[], None], name: str, stop: threading.Event) -> None:
    """Run `action` every `interval` seconds until `stop` is set; a failed pass is logged and
    the next one comes on time."""
    while not stop.is_set():
        try:
            action()
        except Exception:
            log.exception("%s pass failed; trying again", name)
        stop.wait(interval)
