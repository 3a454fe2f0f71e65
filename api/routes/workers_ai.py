"""Workers AI's REST interface: run a model on its input schema while the caller waits, at our
short path and at Cloudflare's own (whose account id is taken and ignored)."""

from functools import partial

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import IdempotencyKeyDep, SettingsDep
from api.dialects import WORKERS_AI_PATHS
from api.dialects.workers_ai import ResponseEvents, WorkersAiResponse, answer
from api.interactive import InteractiveDep, event_stream_response, served_model
from jobs import service
from jobs.schemas.native import WorkersAiInput

router = APIRouter(tags=["workers-ai"])

STREAM = event_stream_response(
    'The answer; with `stream: true`, `data: {"response": ...}` events, then `data: [DONE]`.'
)


async def run_model(
    model: str,
    body: WorkersAiInput,
    interactive: InteractiveDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Run a model (a name or alias) on a Workers AI input; `stream: true` streams its text."""
    # The path's model wins over the body's.
    body = body.model_copy(update={"model": served_model(model).name})
    submission = await interactive.submit(
        partial(service.prepare_native, body, settings),
        stream=body.stream,
        idempotency_key=idempotency_key,
    )
    if body.stream:
        return await interactive.stream(submission, ResponseEvents())
    return interactive.json(submission, answer(await interactive.finished(submission)))


short_path, cloudflare_path = WORKERS_AI_PATHS
router.add_api_route(
    short_path,
    run_model,
    methods=["POST"],
    response_model=WorkersAiResponse,
    responses={200: STREAM},
)
# Cloudflare's own path, for its curl commands and SDKs with only the host changed: the same
# operation, which the document shows once.
router.add_api_route(cloudflare_path, run_model, methods=["POST"], include_in_schema=False)
