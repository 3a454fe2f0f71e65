"""Engine and session factory; one of each per process."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, and_, create_engine, event, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from jobs.errors import InvalidParameter


class Base(DeclarativeBase):
    pass


Row = TypeVar("Row", bound=Base)


def add_once(session: Session, row: Row, existing: Callable[[], Row | None]) -> tuple[Row, bool]:
    """Add a new row (flushed, in a savepoint), unless a request with the same idempotency
    key committed its row first (a unique constraint refuses this one): then that row, and
    False. The rest of the unit of work is kept either way."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = existing()
        if found is None:
            raise
        return found, False
    return row, True


def insert_ignoring_duplicates(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert the rows, skipping those whose key is already there (Postgres or SQLite): an
    insert that may run twice, or race another, adds each row once."""
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def newest_first(
    session: Session, query: Select[Row], after: str | None, limit: int, noun: str
) -> tuple[list[Row], bool]:
    """A page of `query`'s rows (an owner's objects, with `id`, `owner` and `created_at`),
    newest first, and whether more follow; `after` is the id of the last row of the page
    before, one of the owner's (else a 422 naming `after`)."""
    model: Any = query.column_descriptions[0]["entity"]
    if after is not None:
        anchor: Any = session.scalar(query.where(model.id == after))
        if anchor is None:
            raise InvalidParameter("after", after, f"no {noun} of yours has this id")
        query = query.where(
            or_(
                model.created_at < anchor.created_at,
                and_(model.created_at == anchor.created_at, model.id < anchor.id),
            )
        )
    order = (model.created_at.desc(), model.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


@lru_cache
def get_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # SQLAlchemy begins transactions itself (below): pysqlite's own handling would
            # end a unit of work at the RELEASE of its first SAVEPOINT.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):  # type: ignore[no-untyped-def]
            connection.exec_driver_sql("BEGIN")

        return engine
    return create_engine(
        database_url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        # A database host that does not answer is an outage within seconds (a 503, a job
        # given back), not a request or a worker that hangs for minutes.
        connect_args={"connect_timeout": 5},
    )


@lru_cache
def get_session_factory(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(database_url), expire_on_commit=False)


@contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """`session` as one unit of work: committed on success, rolled back on error, closed."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A new session, as one unit of work."""
    with unit_of_work(get_session_factory(database_url)()) as session:
        yield session
