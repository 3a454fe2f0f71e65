"""Liveness and readiness."""

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    """The API is up and reaches its database."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
