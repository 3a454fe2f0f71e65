"""Alembic migrations; `mbatch migrate` applies them."""
