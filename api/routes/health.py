"""Liveness and readiness."""

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the API process is up (it asks nothing of Postgres or storage)."""
    # An outage of Postgres or storage is answered with 503s elsewhere; restarting a live API
    # would not end it, so liveness does not depend on them.
    return {"status": "ok"}
