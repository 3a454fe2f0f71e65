"""Celery tasks. They hold no state of their own: the runtime with the loaded model is held
by their base class, set once at start-up on the one task instance that Celery registers per
process (the "Instantiation" section of Celery's task guide)."""

from celery import Task
from sqlalchemy.exc import OperationalError

from jobs.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.runtime import WorkerRuntime


class RuntimeTask(Task):
    """A task that runs on the worker's runtime, which `mbatch worker` sets before it consumes."""

    _runtime: WorkerRuntime | None = None

    @property
    def runtime(self) -> WorkerRuntime:
        if self._runtime is None:
            raise RuntimeError("this worker has no model loaded")
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime


@app.task(
    base=RuntimeTask,
    bind=True,
    name=RUN_JOB_TASK,
    # Postgres unreachable for a moment: try the message again, explicitly and boundedly;
    # past that the job stays queued in Postgres and maintenance publishes it again.
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def run_job(self: RuntimeTask, job_id: str) -> int:
    return self.runtime.handle_message(job_id)
