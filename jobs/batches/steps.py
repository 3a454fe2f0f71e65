"""The lease a batch's long steps (validating, finalizing) are taken under. Taking a step sets
a token on the batch row; only its holder renews the lease, ends the step or records that it
failed, so a process that dies mid-step leaves the batch to maintenance and one that lost its
step can no longer act on it. A failure is tried again after a pause (an outage of ours is
waited out without counting as a try); past `batch_step_attempts` tries the batch ends `failed`.

A step runs after the request that started it, with sessions of its own: each step is its
own unit of work, and each of its commits (taking the step, a chunk of lines, the end) is a
transaction of the batch's state machine that others must see at once.
"""

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from jobs.batches.lines import MAX_MESSAGE_CHARS, clip
from jobs.batches.store import stop_jobs
from jobs.errors import MbatchError
from jobs.models import Batch, BatchStatus
from jobs.outages import unavailable
from jobs.settings import Settings
from jobs.timeutil import utcnow
from jobs.webhooks.events import batch_ended

log = logging.getLogger(__name__)

STEP_LEASE = timedelta(minutes=5)
# The attempt-based pause never grows past this.
MAX_STEP_PAUSE = timedelta(hours=6)
SessionScope = Callable[[], Any]


def lease_free(now: datetime) -> ColumnElement[bool]:
    """Whether nobody holds the batch's step at `now` (never taken, or its lease lapsed)."""
    return or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now)


@dataclass
class Step:
    """A batch's step (validating, finalizing) as one call runs it. Taking it sets a token on
    the batch row; only the token's holder renews the step's lease, ends the step or records
    its failure, so a process that lost the step (its lease lapsed and another took it) can
    no longer act on the batch."""

    batch_id: str
    name: str
    token: str | None = None

    def held(self) -> tuple[ColumnElement[bool], ...]:
        return (Batch.id == self.batch_id, Batch.step_token == self.token)


class StepTakenOver(Exception):
    """The step's lease lapsed and another process took it: this one stops."""


def take_step(
    session: Session, settings: Settings, step: Step, statuses: Iterable[BatchStatus]
) -> Batch | None:
    """Take the batch's step if it is in one of `statuses` and nobody holds it. A step taken
    as often as it may be without ever ending (its process died each time) ends the batch."""
    now, token = utcnow(), secrets.token_hex(16)
    taken = session.execute(
        update(Batch)
        .where(Batch.id == step.batch_id, Batch.status.in_(list(statuses)), lease_free(now))
        .values(
            lease_expires_at=now + STEP_LEASE,
            step_token=token,
            step_attempts=Batch.step_attempts + 1,
        )
    )
    session.commit()
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None
    step.token = token
    batch = session.scalars(
        select(Batch).where(*step.held()).execution_options(populate_existing=True)
    ).one()
    if batch.step_attempts > settings.batch_step_attempts:
        _give_up(session, batch, tries=batch.step_attempts - 1)  # this take does not run
        session.commit()
        return None
    return batch


def renew_step(scope: SessionScope, step: Step) -> bool:
    """Keep a long step's lease; False once the step is no longer ours."""
    with scope() as session:
        renewed = session.execute(
            update(Batch).where(*step.held()).values(lease_expires_at=utcnow() + STEP_LEASE)
        )
        session.commit()
        return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]


@contextmanager
def step_guard(scope: SessionScope, settings: Settings, batch_id: str, name: str) -> Iterator[Step]:
    """Runs a step so that an error never breaks whoever called it: one batch's failure
    does not stop another batch's step in the same pass. The failure is recorded on the
    batch, which tries the step again later (see `_step_failed`)."""
    step = Step(batch_id, name)
    try:
        yield step
    except Exception as exc:
        log.exception("batch %s: %s failed", batch_id, name)
        if step.token is None:
            return  # failed before it took the step: nothing of the batch's to record
        try:
            with scope() as session:
                _step_failed(session, settings, step, exc)
        except Exception:  # the database is away too: the lease lapses and it runs again
            log.exception("batch %s: could not record that %s failed", batch_id, name)


def _public_reason(exc: BaseException) -> str:
    """Why a step failed, as the batch's owner may read it: no SQL, hosts or traces."""
    if isinstance(exc, MbatchError):
        return exc.message
    return f"an internal error ({type(exc).__name__})"


def _step_failed(session: Session, settings: Settings, step: Step, exc: BaseException) -> None:
    """An outage of ours is waited out, at a steady pace, and does not count as a try. Any
    other failure is tried again after a pause that grows fourfold with each try; past
    `batch_step_attempts` tries the batch ends `failed`, saying why."""
    batch = session.scalar(select(Batch).where(*step.held()).with_for_update())
    if batch is None or batch.status.finished:
        return  # no longer ours to judge
    batch.step_token = None
    down = unavailable(exc)
    if down is not None:
        batch.step_attempts -= 1
        batch.step_error = f"{step.name} is waiting: {down} is unavailable"
        pause = timedelta(seconds=settings.batch_step_retry_seconds)
    else:
        batch.step_error = clip(f"{step.name} failed: {_public_reason(exc)}", MAX_MESSAGE_CHARS)
        if batch.step_attempts >= settings.batch_step_attempts:
            _give_up(session, batch, tries=batch.step_attempts)
            session.commit()
            return
        growth = 4 ** min(max(batch.step_attempts - 1, 0), 16)
        pause = min(timedelta(seconds=settings.batch_step_retry_seconds * growth), MAX_STEP_PAUSE)
    batch.lease_expires_at = utcnow() + pause
    session.commit()


def _give_up(session: Session, batch: Batch, tries: int) -> None:
    """The batch ends `failed`, saying why; its lines that have not ended are cancelled, and
    its counts keep the lines that did."""
    why = batch.step_error or "the process working on it stopped each time"
    message = f"the batch could not be processed in {tries} tries: {why}"
    stop_jobs(session, batch.id, "batch_failed", message)
    # The counters as the lines' ends left them (stop_jobs counted its own on the row).
    succeeded, failed = session.execute(
        select(Batch.lines_succeeded, Batch.lines_failed).where(Batch.id == batch.id)
    ).one()
    batch.completed, batch.failed = succeeded, batch.invalid + failed
    batch.status, batch.failed_at = BatchStatus.failed, utcnow()
    batch.lease_expires_at = batch.step_token = None
    batch.errors = [{"code": "batch_processing_failed", "message": message}]
    # Its webhook event, committed by the caller with the ending.
    batch_ended(session, batch.owner, batch.id, BatchStatus.failed.value, batch.callback_url)
    log.error("batch %s failed: %s", batch.id, message)
