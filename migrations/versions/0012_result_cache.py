"""The result cache: answers kept for identical deterministic requests of the same owner,
which a job or batch asks for with `"cache": true`; jobs note their key and whether they were
answered from it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "result_cache",
        sa.Column("owner", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("expires_at", _when(), nullable=False),
        sa.Column("response_text", sa.Text()),
        sa.Column("response_uri", sa.Text()),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("logprobs", sa.JSON(none_as_null=True)),
    )
    op.create_index("ix_result_cache_expires_at", "result_cache", ["expires_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(64)))
        batch.add_column(
            sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("cache", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("cache")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cached")
        batch.drop_column("cache_key")
    op.drop_index("ix_result_cache_expires_at", table_name="result_cache")
    op.drop_table("result_cache")
