"""Publishing jobs onto the broker; both the API and the worker's maintenance publish here.

A message carries only a job id: Postgres holds the job, so a lost or repeated message can
neither lose a job nor run it twice.
"""

from typing import Any, Protocol

from celery import Celery

from jobs.settings import Settings

RUN_JOB_TASK = "mbatch.run_job"
DELIVER_EVENT_TASK = "mbatch.deliver_event"
WEBHOOKS_QUEUE = "mbatch.webhooks"


class JobQueue(Protocol):
    def publish(self, job_id: str, queue: str) -> None: ...

    def publish_event(self, event_id: str, countdown: float = 0) -> None:
        """Wake `mbatch webhooks` for a webhook event, after `countdown` seconds."""


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


def serve(
    app: Celery, hostname: str, queue: str, pool: str, concurrency: int, loglevel: str
) -> None:
    """Run a Celery worker of `app` on `queue` until it is stopped: the GPU workers (solo
    pool) and `mbatch webhooks` (threads) alike."""
    app.Worker(
        hostname=hostname,
        queues=[queue],
        pool=pool,
        concurrency=concurrency,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        # Nothing listens for heartbeat events, and with the broker down the event loop
        # retries sending one without end: the worker never reaches its reconnect path and
        # ignores SIGTERM until the broker is back.
        without_heartbeat=True,
    ).start()


class InProcessQueue:
    """A queue with no broker, for `mbatch run` and the tests: the runtime claims from the
    database, so a publish only records the job id."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.events: list[str] = []

    def publish(self, job_id: str, queue: str) -> None:
        self.published.append(job_id)

    def publish_event(self, event_id: str, countdown: float = 0) -> None:
        self.events.append(event_id)


class CeleryJobQueue:
    def __init__(self, settings: Settings) -> None:
        self.app = Celery("mbatch-publisher")
        self.app.conf.update(celery_config(settings))

    def publish(self, job_id: str, queue: str) -> None:
        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue)

    def publish_event(self, event_id: str, countdown: float = 0) -> None:
        self.app.send_task(
            DELIVER_EVENT_TASK,
            args=[event_id],
            queue=WEBHOOKS_QUEUE,
            routing_key=WEBHOOKS_QUEUE,
            countdown=countdown or None,
        )
