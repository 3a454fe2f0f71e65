"""Dependencies the route handlers ask for by type."""

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.orm import Session

from api.waiting import JobWaiter
from jobs.db import get_session_factory, session_scope, unit_of_work
from jobs.keys import authenticate
from jobs.queue import JobQueue
from jobs.settings import Settings, get_settings
from jobs.storage import Storage

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """The request's unit of work: what the domain's functions flushed is committed once the
    handler returns, before the response is sent; an error rolls all of it back."""
    with unit_of_work(get_session_factory(settings.database_url)()) as session:
        yield session


# Function scope: the commit happens before the response goes out (and before background
# tasks, which read what it committed), and a failed commit is the request's error.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_scope(settings: SettingsDep) -> Callable[[], AbstractContextManager[Session]]:
    """Sessions of their own, for work that runs after the response (a batch's steps)."""
    return functools.partial(session_scope, settings.database_url)


ScopeDep = Annotated[Callable[[], AbstractContextManager[Session]], Depends(get_scope)]


# auto_error=False: FastAPI's own refusal is `{"detail": ...}` (a 403 in its older
# releases); `authenticate` answers a missing or wrong key with our 401 `{"error": ...}`.
# Depending on the scheme is what puts it in the OpenAPI document, on every route that asks
# for an owner.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `mbatch keys create`: `Authorization: Bearer <key>`.",
)


def get_owner(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    return authenticate(session, credentials.credentials if credentials else None)


OwnerDep = Annotated[str, Depends(get_owner)]


def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue  # type: ignore[no-any-return]


def get_redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


StorageDep = Annotated[Storage, Depends(get_storage)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
IdempotencyKeyDep = Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)]


def get_waiter_factory(
    request: Request,
    redis: RedisDep,
    scope: ScopeDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> Callable[[str], JobWaiter]:
    """Makes the caller's wait for one of its jobs (`api.waiting`), which notices the caller
    going away between its reads."""
    return functools.partial(
        JobWaiter,
        redis,
        scope,
        storage,
        owner,
        timeout_seconds=settings.sync_timeout_seconds,
        disconnected=request.is_disconnected,
    )


WaiterDep = Annotated[Callable[[str], JobWaiter], Depends(get_waiter_factory)]
