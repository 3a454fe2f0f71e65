"""The further samples of a job that asked for n > 1: for samples 1..n-1, each one's text (or
the key of its stored object), finish reason, completion tokens and logprobs.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("choices", sa.JSON(none_as_null=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("choices")
