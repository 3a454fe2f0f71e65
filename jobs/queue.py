"""Publishing jobs onto the broker; both the API and the worker's maintenance publish here.

A message carries only a job id: Postgres holds the job, so a lost or repeated message can
neither lose a job nor run it twice.
"""

from typing import Any, Protocol

from celery import Celery

from jobs.settings import Settings

RUN_JOB_TASK = "mbatch.run_job"


class JobQueue(Protocol):
    def publish(self, job_id: str, queue: str) -> None: ...


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration shared by the publishing side and the workers."""
    return {
        "broker_url": settings.broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Redis hands an unacknowledged message out again after this long: it must
            # exceed the longest a message can wait, or batches run twice (Postgres would
            # still refuse the second claim, but the work of loading it is wasted).
            "visibility_timeout": settings.visibility_timeout_seconds,
        },
        "worker_hijack_root_logger": False,
    }


class InProcessQueue:
    """A queue with no broker, for `mbatch run` and the tests: the runtime claims from the
    database, so a publish only records the job id."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, job_id: str, queue: str) -> None:
        self.published.append(job_id)


class CeleryJobQueue:
    def __init__(self, settings: Settings) -> None:
        self.app = Celery("mbatch-publisher")
        self.app.conf.update(celery_config(settings))

    def publish(self, job_id: str, queue: str) -> None:
        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue)
