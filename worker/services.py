"""What every part of a worker works with: its settings, the database, storage and the queue."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage

SessionScope = Callable[[], AbstractContextManager[Session]]


@dataclass(frozen=True)
class Services:
    settings: Settings
    session_scope: SessionScope
    storage: Storage
    queue: JobQueue
