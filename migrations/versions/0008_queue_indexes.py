"""Partial indexes that keep the hot paths flat as the queue and the history grow: queued
jobs by model and when their message went out (publishing), scheduled jobs by when they are
due, and finished jobs by when they ended (retention).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# (name, columns, condition); the same conditions as in jobs/models.py, in both dialects.
INDEXES = (
    ("ix_jobs_queued_enqueued", ["model", "enqueued_at"], "status = 'queued'"),
    ("ix_jobs_scheduled_run_at", ["run_at"], "status = 'scheduled'"),
    ("ix_jobs_finished_at", ["finished_at"], "status IN ('succeeded', 'failed', 'cancelled')"),
)


def upgrade() -> None:
    for name, columns, condition in INDEXES:
        op.create_index(
            name,
            "jobs",
            columns,
            postgresql_where=sa.text(condition),
            sqlite_where=sa.text(condition),
        )


def downgrade() -> None:
    for name, _, _ in reversed(INDEXES):
        op.drop_index(name, table_name="jobs")
