"""The lane a job is claimed from (interactive, native, file batch) and whether its text is
streamed while it decodes, with the index the claim reads lanes and owners through.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

QUEUED = "status = 'queued'"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("lane", sa.SmallInteger(), nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(
            sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # File-batch lines not yet run keep their place behind native jobs (finished ones are
    # left alone: the lane only matters to a claim).
    op.execute(
        "UPDATE jobs SET lane = 2 WHERE batch_id IS NOT NULL "
        "AND status IN ('scheduled', 'queued', 'running')"
    )
    op.create_index(
        "ix_jobs_queued_lane_owner",
        "jobs",
        ["model", "lane", "owner", "created_at"],
        postgresql_where=sa.text(QUEUED),
        sqlite_where=sa.text(QUEUED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_lane_owner", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stream")
        batch.drop_column("lane")
