"""A batch's running counters (lines succeeded and failed, tokens and cost of the lines that
succeeded), counted as each line ends; and a partial index of batch lines that have not
ended, so that whether a batch is done is one index probe. Existing batches get their
counters from their lines once, here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COUNTERS = (
    ("lines_succeeded", sa.Integer(), "count(*)", "status = 'succeeded'"),
    ("lines_failed", sa.Integer(), "count(*)", "status IN ('failed', 'cancelled')"),
    ("prompt_tokens", sa.BigInteger(), "sum(prompt_tokens)", "status = 'succeeded'"),
    ("completion_tokens", sa.BigInteger(), "sum(completion_tokens)", "status = 'succeeded'"),
    ("cost", sa.Numeric(20, 10), "sum(cost_input + cost_output)", "status = 'succeeded'"),
)
UNFINISHED_LINES = "batch_id IS NOT NULL AND status IN ('scheduled', 'queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        for name, kind, _, _ in COUNTERS:
            batch.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
    for name, _, total, condition in COUNTERS:
        op.execute(
            f"UPDATE batches SET {name} = coalesce((SELECT {total} FROM jobs"
            f" WHERE jobs.batch_id = batches.id AND {condition}), 0)"
        )
    op.create_index(
        "ix_jobs_batch_unfinished",
        "jobs",
        ["batch_id"],
        postgresql_where=sa.text(UNFINISHED_LINES),
        sqlite_where=sa.text(UNFINISHED_LINES),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_unfinished", table_name="jobs")
    with op.batch_alter_table("batches") as batch:
        for name, _, _, _ in reversed(COUNTERS):
            batch.drop_column(name)
