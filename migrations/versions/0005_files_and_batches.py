"""Files and Batches: the OpenAI Batch API.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MONEY = sa.Numeric(20, 10)


def _at(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("file_batch_id", sa.String(40)))
        batch.add_column(sa.Column("custom_id", sa.String(512)))
        batch.add_column(sa.Column("line", sa.Integer))
        batch.create_index("ix_jobs_file_batch_line", ["file_batch_id", "line"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("storage_key", sa.Text, nullable=False),
        _at("created_at"),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("callback_url", sa.Text),
        sa.Column("idempotency_key", sa.String(256)),
        sa.Column("retry_of", sa.String(40)),
        sa.Column("max_cost", MONEY),
        sa.Column("errors", sa.JSON),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("invalid", sa.Integer, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("output_file_id", sa.String(40)),
        sa.Column("error_file_id", sa.String(40)),
        _at("lease_expires_at"),
        _at("created_at"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        *[
            _at(f"{step}_at")
            for step in (
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        ],
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_batches_owner_idempotency_key"),
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_line_errors",
        sa.Column("batch_id", sa.String(40), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("custom_id", sa.String(512)),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("param", sa.String(256)),
    )


def downgrade() -> None:
    op.drop_table("batch_line_errors")
    op.drop_index("ix_batches_status", "batches")
    op.drop_table("batches")
    op.drop_table("files")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_file_batch_line")
        batch.drop_column("line")
        batch.drop_column("custom_id")
        batch.drop_column("file_batch_id")
