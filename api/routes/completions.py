"""OpenAI's (and DeepInfra's) chat completions and completions, answered while the caller
waits, whole or as `stream: true` chunks; also under DeepInfra's `/v1/openai` prefix."""

from functools import partial

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import IdempotencyKeyDep, SettingsDep
from api.dialects import CHAT_PATHS, COMPLETION_PATHS
from api.dialects.openai import ChatCompletion, ChunkStream, TextCompletion
from api.interactive import Interactive, InteractiveDep, event_stream_response, served_model
from jobs import service
from jobs.batches.output_format import response_body
from jobs.schemas.openai import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    ChatCompletionBody,
    CompletionBody,
)
from jobs.settings import Settings

router = APIRouter(tags=["openai"])

STREAM = event_stream_response(
    "The answer; with `stream: true`, its chunks as server-sent events, then `data: [DONE]`."
)


async def _answer(
    body: ChatCompletionBody | CompletionBody,
    endpoint: str,
    interactive: Interactive,
    settings: Settings,
    idempotency_key: str | None,
) -> Response:
    served_model(body.model or settings.model)  # OpenAI's 404 for a model it does not serve
    submission = await interactive.submit(
        partial(service.prepare_openai, body, settings),
        stream=bool(body.stream),
        idempotency_key=idempotency_key,
    )
    if body.stream:
        chunks = ChunkStream(submission.job, endpoint, body.include_usage)
        return await interactive.stream(submission, chunks)
    finished = await interactive.finished(submission)
    whole = response_body(finished.job, finished.text, endpoint, finished.choice_texts)
    return interactive.json(submission, whole)


async def create_chat_completion(
    body: ChatCompletionBody,
    interactive: InteractiveDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Answer a chat (OpenAI's `chat.completion`, with `usage.estimated_cost`)."""
    return await _answer(body, CHAT_ENDPOINT, interactive, settings, idempotency_key)


async def create_completion(
    body: CompletionBody,
    interactive: InteractiveDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:
    """Continue a raw prompt (OpenAI's `text_completion`, with `usage.estimated_cost`)."""
    return await _answer(body, COMPLETIONS_ENDPOINT, interactive, settings, idempotency_key)


for paths, handler, model in (
    (CHAT_PATHS, create_chat_completion, ChatCompletion),
    (COMPLETION_PATHS, create_completion, TextCompletion),
):
    path, deepinfra_path = paths
    router.add_api_route(
        path, handler, methods=["POST"], response_model=model, responses={200: STREAM}
    )
    # DeepInfra's prefix: the same operation, so the document shows it once.
    router.add_api_route(deepinfra_path, handler, methods=["POST"], include_in_schema=False)
