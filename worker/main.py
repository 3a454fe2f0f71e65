"""`mbatch worker`: load the model, then serve its queue from this one process."""

import gc
import logging
import os
import socket
from pathlib import Path

from jobs.db import session_scope
from jobs.queue import CeleryJobQueue, serve
from jobs.registry import resolve_model
from jobs.settings import get_settings
from jobs.storage import storage_from_settings
from worker.engine.loader import load_model
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def run_worker(model: str, weights: Path | None = None, loglevel: str = "INFO") -> None:
    settings = get_settings()
    spec = resolve_model(model)
    # The model is loaded before the worker consumes anything, in the process that runs the
    # tasks: the solo pool never forks, so no CUDA state crosses a fork.
    loaded = load_model(spec, settings, weights)
    worker_id = f"{spec.name}-{os.getpid()}@{socket.gethostname()}"

    def scope():  # type: ignore[no-untyped-def]
        return session_scope(settings.database_url)

    runtime = WorkerRuntime(
        settings,
        loaded,
        scope,
        storage_from_settings(settings),
        CeleryJobQueue(settings),
        worker_id,
    )
    from worker import tasks
    from worker.celery_app import app

    # Set on the task instance the worker will run: Celery registers one per process.
    tasks.run_job.runtime = runtime
    # What start-up made lives as long as the process: keep the garbage collector off it, so
    # collections during decoding stay short.
    gc.freeze()
    runtime.timers.start()
    log.info("worker %s serving queue %s", worker_id, spec.queue)
    try:
        serve(app, worker_id, spec.queue, "solo", 1, loglevel)
    finally:
        runtime.timers.stop()
        runtime.streams.close()
        runtime.choice.signal.close()
