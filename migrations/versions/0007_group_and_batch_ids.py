"""Names that say what they are: a job's decode group is `group_id`, and the Batches-API
batch it is a line of is `batch_id` (they were `batch_id` and `file_batch_id`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # RENAME COLUMN is plain SQL in Postgres and SQLite alike; in that order, since the second
    # takes the name the first gives up.
    op.drop_index("ix_jobs_file_batch_line", table_name="jobs")
    op.execute("ALTER TABLE jobs RENAME COLUMN batch_id TO group_id")
    op.execute("ALTER TABLE jobs RENAME COLUMN file_batch_id TO batch_id")
    op.create_index("ix_jobs_batch_line", "jobs", ["batch_id", "line"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_line", table_name="jobs")
    op.execute("ALTER TABLE jobs RENAME COLUMN batch_id TO file_batch_id")
    op.execute("ALTER TABLE jobs RENAME COLUMN group_id TO batch_id")
    op.create_index("ix_jobs_file_batch_line", "jobs", ["file_batch_id", "line"])
