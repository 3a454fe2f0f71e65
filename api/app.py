"""The FastAPI application."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, DefaultJsonContentType, RefuseNul
from api.openapi import install_openapi
from api.routes.batches import router as batches_router
from api.routes.completions import router as completions_router
from api.routes.files import router as files_router
from api.routes.health import router as health_router
from api.routes.jobs import router as jobs_router
from api.routes.loras import router as loras_router
from api.routes.models import router as models_router
from api.routes.schedules import router as schedules_router
from api.routes.webhooks import router as webhooks_router
from api.routes.workers_ai import router as workers_ai_router
from api.waiting import READ_BLOCK_SECONDS
from jobs.queue import CeleryJobQueue
from jobs.settings import Settings, get_settings
from jobs.storage import storage_from_settings
from jobs.tokenizer import v1_tokenizer


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Clients are made once per process, at start-up.
        app.state.storage = storage_from_settings(settings)
        app.state.queue = CeleryJobQueue(settings)
        # The sync and streaming interfaces read jobs' streams of text here (`api.waiting`).
        app.state.redis = Redis.from_url(
            settings.broker_url,
            # A Redis that stops answering must not hold a wait past its deadline: a read
            # blocks for at most READ_BLOCK_SECONDS, and the socket gives up soon after.
            socket_timeout=READ_BLOCK_SECONDS + 2,
            socket_connect_timeout=2,
        )
        v1_tokenizer()
        yield
        await app.state.redis.aclose()

    app = FastAPI(
        title="mbatch",
        version="0.1.0",
        summary="Queue-based batch inference for Mistral-7B-Instruct models",
        lifespan=lifespan,
    )
    app.add_middleware(DefaultJsonContentType)
    # Multipart overhead on top of the adapter's own limit, which the route checks exactly.
    uploads = {
        "/v1/loras": settings.max_lora_bytes + 1024 * 1024,
        "/v1/files": settings.max_file_bytes + 1024 * 1024,
    }
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, uploads=uploads)
    app.add_middleware(RefuseNul)
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    for router in (
        health_router,
        jobs_router,
        loras_router,
        files_router,
        batches_router,
        schedules_router,
        webhooks_router,
        completions_router,
        models_router,
        workers_ai_router,
    ):
        app.include_router(router)
    install_openapi(app)
    return app
