"""The FastAPI application."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, DefaultJsonContentType, RefuseNul
from api.openapi import install_openapi
from api.routes.batches import router as batches_router
from api.routes.files import router as files_router
from api.routes.health import router as health_router
from api.routes.jobs import router as jobs_router
from api.routes.loras import router as loras_router
from api.routes.schedules import router as schedules_router
from api.routes.webhooks import router as webhooks_router
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
        v1_tokenizer()
        yield

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
    ):
        app.include_router(router)
    install_openapi(app)
    return app
