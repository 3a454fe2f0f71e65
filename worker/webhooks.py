"""`mbatch webhooks`: the delivery worker. A Celery worker of its own on the `mbatch.webhooks`
queue, with a pool of threads (a delivery waits on a receiver, not on a CPU), apart from the
GPU workers: a slow receiver never holds a model's queue.

It loads no model: this module imports neither `worker.tasks` nor the engine (no torch). Each
message names an event, and `jobs.webhooks.delivery.deliver` decides from Postgres whether
there is an attempt to make. Besides the maintenance pass (GPU workers, `mbatch beat`), the
worker publishes due events itself every PUBLISH_INTERVAL_SECONDS, so a retry or an event
whose message was lost goes out within about a second of being due.
"""

import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.maintenance import repeat
from jobs.queue import DELIVER_EVENT_TASK, WEBHOOKS_QUEUE, CeleryJobQueue, celery_config, serve
from jobs.settings import Settings, get_settings
from jobs.storage import Storage, storage_from_settings
from jobs.webhooks.delivery import deliver
from jobs.webhooks.publishing import publish_due

log = logging.getLogger(__name__)

# How often the worker publishes the events that are due (one read of a partial index).
PUBLISH_INTERVAL_SECONDS = 1.0

app = Celery("mbatch-webhooks")


@dataclass(frozen=True)
class Delivery:
    """What every delivery thread shares, made once when the worker starts."""

    settings: Settings
    scope: Callable[[], AbstractContextManager[Session]]
    storage: Storage
    queue: CeleryJobQueue


_delivery: list[Delivery] = []


@app.task(name=DELIVER_EVENT_TASK, ignore_result=True)
def deliver_event(event_id: str) -> str | None:
    """One attempt of the event, if one is due and nobody else is making it."""
    shared = _delivery[0]
    status = deliver(shared.scope, shared.storage, shared.queue, shared.settings, event_id)
    return status.value if status is not None else None


def _scope(settings: Settings) -> Callable[[], AbstractContextManager[Session]]:
    def scope() -> AbstractContextManager[Session]:
        return session_scope(settings.database_url)

    return scope


def run_webhooks_worker(loglevel: str = "INFO") -> None:
    """Serve the `mbatch.webhooks` queue with `webhook_concurrency` threads until stopped."""
    settings = get_settings()
    app.conf.update(celery_config(settings))
    shared = Delivery(
        settings, _scope(settings), storage_from_settings(settings), CeleryJobQueue(settings)
    )
    _delivery[:] = [shared]
    stop = threading.Event()
    publisher = threading.Thread(
        target=repeat,
        args=(
            PUBLISH_INTERVAL_SECONDS,
            lambda: publish_due(shared.scope, shared.queue, settings),
            "webhook publishing",
            stop,
        ),
        name="mbatch-webhook-publishing",
        daemon=True,
    )
    publisher.start()
    worker_id = f"webhooks-{os.getpid()}@{socket.gethostname()}"
    log.info("webhooks worker %s serving queue %s", worker_id, WEBHOOKS_QUEUE)
    try:
        serve(app, worker_id, WEBHOOKS_QUEUE, "threads", settings.webhook_concurrency, loglevel)
    finally:
        stop.set()
