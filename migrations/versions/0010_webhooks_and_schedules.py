"""Webhooks (owners' signing secrets, the events outbox and every delivery attempt) and
schedules (cron-driven jobs and batches, and their runs).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

MONEY = sa.Numeric(20, 10)


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column("owner", sa.String(128), primary_key=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128)),
        sa.Column("previous_until", _when()),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _when()),
        sa.Column("enqueued_at", _when()),
        sa.Column("lease_expires_at", _when()),
        sa.Column("delivery_token", sa.String(32)),
        sa.Column("payload", sa.Text()),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("delivered_at", _when()),
    )
    op.create_index(
        "ix_webhook_events_owner_created", "webhook_events", ["owner", "created_at", "id"]
    )
    op.create_index("ix_webhook_events_object", "webhook_events", ["object_id"])
    pending = sa.text("status = 'pending'")
    op.create_index(
        "ix_webhook_events_due",
        "webhook_events",
        ["next_attempt_at"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    ended = sa.text("status IN ('delivered', 'failed')")
    op.create_index(
        "ix_webhook_events_ended",
        "webhook_events",
        ["created_at"],
        postgresql_where=ended,
        sqlite_where=ended,
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("event_id", sa.String(40), primary_key=True),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("at", _when(), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("response", sa.Text()),
        sa.Column("error", sa.Text()),
    )
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("cron", sa.String(256), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("callback_url", sa.Text()),
        sa.Column("max_cost", MONEY),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", _when()),
        sa.Column("last_run_at", _when()),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_index("ix_schedules_owner", "schedules", ["owner"])
    active = sa.text("NOT paused")
    op.create_index(
        "ix_schedules_next_run",
        "schedules",
        ["next_run_at"],
        postgresql_where=active,
        sqlite_where=active,
    )
    op.create_table(
        "schedule_runs",
        sa.Column("schedule_id", sa.String(40), primary_key=True),
        sa.Column("fire_time", _when(), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("batch_id", sa.String(40)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_index("ix_schedule_runs_created", "schedule_runs", ["created_at"])


def downgrade() -> None:
    for table in ("schedule_runs", "schedules", "webhook_attempts", "webhook_events"):
        op.drop_table(table)
    op.drop_table("webhook_secrets")
