"""Celery tasks. Each holds no state: the runtime with the loaded model is set at start-up."""

from sqlalchemy.exc import OperationalError

from jobs.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.runtime import WorkerRuntime

_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


@app.task(
    name=RUN_JOB_TASK,
    # Postgres unreachable for a moment: try the message again, explicitly and boundedly;
    # past that the job stays queued in Postgres and maintenance publishes it again.
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def run_job(job_id: str) -> int:
    if _runtime is None:
        raise RuntimeError("this worker has no model loaded")
    return _runtime.handle_message(job_id)
