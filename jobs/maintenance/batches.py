"""The passes that move batches forward whatever happened to the process working on them:
`advance` (run by every maintenance pass) expires batches past their window, takes up
validation that failed or was abandoned, and finalizes batches whose lines have all ended;
`enforce_max_cost` (run by the worker after each static batch) stops batches that have spent
their `max_cost`. Each batch's step runs on its own, so one that fails does not stop the others.
"""

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from jobs.batches.finalizing import finalize
from jobs.batches.steps import SessionScope, lease_free
from jobs.batches.store import STEP_RESET, stop_jobs, unfinished_lines
from jobs.batches.validation import validate_batch
from jobs.models import Batch, BatchStatus
from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import utcnow

log = logging.getLogger(__name__)

# Validation of an abandoned batch is taken up by maintenance only after this long, so the
# API process that accepted the batch normally does it.
VALIDATION_GRACE = timedelta(seconds=60)


def advance(scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings) -> None:
    """Expire batches past their window, take up validation that failed or that a process
    abandoned, and finalize batches whose lines have all ended. Each batch's step is run on
    its own: one that fails is tried again later and does not stop the others."""
    now = utcnow()
    try:
        with scope() as session:
            expire_due(session)
    except Exception:
        log.exception("could not expire batches; the next pass tries again")
    with scope() as session:
        abandoned = list(
            session.scalars(
                select(Batch.id).where(
                    Batch.status == BatchStatus.validating,
                    # Left by its API process, or tried before: not the first take's to wait.
                    or_(
                        Batch.created_at < now - VALIDATION_GRACE,
                        Batch.step_attempts > 0,
                        Batch.step_error.is_not(None),
                    ),
                    lease_free(now),
                )
            )
        )
        ready = list(
            session.scalars(
                select(Batch.id).where(
                    or_(
                        and_(Batch.status == BatchStatus.in_progress, ~unfinished_lines(Batch.id)),
                        Batch.status.in_([BatchStatus.finalizing, BatchStatus.cancelling]),
                    ),
                    lease_free(now),
                )
            )
        )
    for batch_id in abandoned:
        validate_batch(scope, storage, queue, settings, batch_id)
    for batch_id in ready:
        finalize(scope, storage, settings, batch_id)


def enforce_max_cost(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Stop batches whose spent cost has passed their `max_cost`: they end `cancelled`, with
    what finished. Checked after each static batch, so one static batch may overshoot."""
    stopped = []
    capped = session.scalars(
        select(Batch)
        .where(
            Batch.id.in_(list(batch_ids)),
            Batch.max_cost.is_not(None),
            Batch.status == BatchStatus.in_progress,
        )
        .execution_options(populate_existing=True)  # the counters as the lines left them
    ).all()
    for batch in capped:
        if batch.max_cost is None or batch.cost <= batch.max_cost:
            continue
        message = f"spent ${batch.cost} of max_cost ${batch.max_cost}"
        session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.status == BatchStatus.in_progress)
            .values(
                status=BatchStatus.cancelling,
                cancelling_at=utcnow(),
                **STEP_RESET,
                errors=[{"code": "max_cost_reached", "message": message}],
            )
        )
        stop_jobs(session, batch.id, "max_cost_reached", message)
        stopped.append(batch.id)
    session.flush()
    return stopped


def expire_due(session: Session) -> list[str]:
    """Batches past their completion window stop; their files hold what finished."""
    running = [BatchStatus.validating, BatchStatus.in_progress]
    # In one order everywhere, so that two maintenance passes never wait on each other.
    due = session.scalars(
        select(Batch.id)
        .where(Batch.status.in_(running), Batch.expires_at < utcnow())
        .order_by(Batch.id)
    ).all()
    expired = []
    for batch_id in due:
        moved = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(running))
            .values(
                status=BatchStatus.finalizing,
                expired_at=utcnow(),
                finalizing_at=utcnow(),
                **STEP_RESET,
            )
        )
        if moved.rowcount == 1:  # type: ignore[attr-defined]
            stop_jobs(session, batch_id, "batch_expired", "the batch's completion window ended")
            expired.append(batch_id)
    session.flush()
    return expired
