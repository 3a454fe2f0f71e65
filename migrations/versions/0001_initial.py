"""API keys and jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

MONEY = sa.Numeric(20, 10)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("lora", sa.String(256)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("sampling", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("callback_url", sa.Text),
        sa.Column("idempotency_key", sa.String(256)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True)),
        sa.Column("enqueued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claim_token", sa.String(40)),
        sa.Column("claimed_by", sa.String(256)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("finish_reason", sa.String(16)),
        sa.Column("response_text", sa.Text),
        sa.Column("response_uri", sa.Text),
        sa.Column("cost_input", MONEY),
        sa.Column("cost_output", MONEY),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    )
    op.create_index("ix_jobs_model_status_created", "jobs", ["model", "status", "created_at"])
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("api_keys")
