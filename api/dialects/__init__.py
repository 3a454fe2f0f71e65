"""The request dialects the API speaks, and which one a path speaks: Workers AI's (the
Cloudflare envelope) on `/ai/run` and `/client/v4`, and ours (OpenAI's error shape) on the rest,
where the OpenAI-compatible routes answer a field out of range with OpenAI's 400."""

import enum

# The OpenAI-compatible routes, also under DeepInfra's `/v1/openai` prefix.
CHAT_PATHS = ("/v1/chat/completions", "/v1/openai/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/v1/openai/completions")
MODELS_PATHS = ("/v1/models", "/v1/openai/models")
# Workers AI's REST paths: our own short one, and Cloudflare's with its account id.
WORKERS_AI_PATHS = ("/ai/run/{model:path}", "/client/v4/accounts/{account_id}/ai/run/{model:path}")
_WORKERS_AI_PREFIXES = ("/ai/run", "/client/v4/")


class Dialect(enum.Enum):
    # `{"error": {code, message, param, type}}`: ours, and OpenAI's (whose SDK reads it).
    native = "native"
    # The same shape; a 422 is answered as OpenAI's 400, which its SDK raises as BadRequestError.
    openai = "openai"
    # `{"result": null, "success": false, "errors": [{code, message}], "messages": []}`.
    workers_ai = "workers_ai"


def dialect_of(path: str) -> Dialect:
    """The dialect of the route at `path` (a request's path, as routed)."""
    if path.startswith(_WORKERS_AI_PREFIXES):
        return Dialect.workers_ai
    if path in CHAT_PATHS or path in COMPLETION_PATHS:
        return Dialect.openai
    return Dialect.native
