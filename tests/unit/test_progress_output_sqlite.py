"""The output stream's cursor on SQLite, the embedded database: its queries must be ones
SQLite accepts (a LIMIT inside a bare UNION branch is not)."""

from pathlib import Path

from sqlalchemy import create_engine

from jobs.batches.progress_output import resume_after
from jobs.db import session_scope
from jobs.models import Base


def test_the_resume_cursor_with_a_limit_runs_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mbatch.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    with session_scope(url) as session:
        assert resume_after(session, "batch_none", 0, limit=5) == 0
        assert resume_after(session, "batch_none", 3, limit=None) == 0
