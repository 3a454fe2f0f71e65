"""How often a batch's current step was taken, why it last failed, and who holds it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("step_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("step_error", sa.Text()))
        batch.add_column(sa.Column("step_token", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("step_token")
        batch.drop_column("step_error")
        batch.drop_column("step_attempts")
