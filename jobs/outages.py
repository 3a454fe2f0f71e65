"""Which errors mean a service of ours (Postgres, object storage) cannot serve for now.

One answer for every caller: the API turns an outage into a 503, a worker gives a job back
without spending its attempts, a batch step tries again later without counting the try.
Anything else (a bug, a missing object, the caller's own fault) is not an outage.
"""

import psycopg
from sqlalchemy import exc as sa_exc

from jobs import storage

# Errors that mean Postgres cannot serve for now: refused or lost connections, a server
# shutting down or out of resources, timeouts, deadlocks; all worth trying again.
DATABASE_ERRORS = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection came free in time
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


def _database_down(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, DATABASE_ERRORS):
        return False
    # Postgres files "program limit exceeded" (an index row or a statement too large) under
    # the same class as an outage; that is the statement's fault, and retrying cannot help.
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    return not str(getattr(orig, "sqlstate", None) or "").startswith("54")


def unavailable(exc: BaseException) -> str | None:
    """What is down, when `exc` (or an error it was raised from) means Postgres or object
    storage cannot serve for now; None for anything else."""
    cause: BaseException | None = exc
    while cause is not None:
        if _database_down(cause):
            return "the database"
        if storage.is_unavailable(cause):
            return "object storage"
        cause = cause.__cause__
    return None
