"""OpenAI's shapes for the sync routes: the chunks of a streamed chat completion or completion
(`data: {...}` each, then `data: [DONE]`), and the model list. A whole answer is the batch
output's own `response_body`, so a sync answer and a batch line read the same."""

from datetime import UTC, date, datetime, time
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.waiting import Finished
from jobs.batches.output_format import response_body
from jobs.models import Job
from jobs.registry import MODELS, ModelSpec
from jobs.schemas.openai import CHAT_ENDPOINT
from jobs.timeutil import unix_seconds


class ChunkStream:
    """The chunks of one job's streamed answer, all with the id, `created` and model that
    its whole answer has (`created` is when it was submitted: the chunks start before it
    ends). With `include_usage`, as OpenAI's: every chunk has `"usage": null`, and a last one
    with no choices has the usage."""

    def __init__(self, job: Job, endpoint: str, include_usage: bool) -> None:
        self.endpoint = endpoint
        self.chat = endpoint == CHAT_ENDPOINT
        self.include_usage = include_usage
        suffix = job.id.removeprefix("job_")
        self.base: dict[str, Any] = {
            "id": f"chatcmpl-{suffix}" if self.chat else f"cmpl-{suffix}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": unix_seconds(job.created_at),
            "model": job.model,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        chunk = {**self.base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> list[dict[str, Any]]:
        """Before the text: a chat's first chunk names the role, as OpenAI's does."""
        if not self.chat:
            return []
        first = self._choice("", None)
        first["delta"] = {"role": "assistant", "content": ""}
        return [self._chunk([first])]

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None)])

    def end(self, finished: Finished) -> list[dict[str, Any]]:
        """The chunk with the finish reason, and the usage chunk where asked for."""
        job = finished.job
        events = [self._chunk([self._choice(None, job.finish_reason or "stop")])]
        if self.include_usage:
            whole = response_body(job, finished.text, self.endpoint, finished.choice_texts)
            events.append(self._chunk([], whole["usage"]))
        return events


# When each model's weights were published, as OpenAI's `created`; a model not named here (the
# tiny one, a random model of v0.1's shape) takes v0.1's date.
RELEASED = {
    "mistral-7b-instruct-v0.1": date(2023, 9, 27),
    "mistral-7b-instruct-v0.2": date(2023, 12, 11),
    "mistral-7b-instruct-v0.1-awq": date(2023, 9, 28),
}


class ModelCard(BaseModel):
    """One served model, as OpenAI's model object, with mbatch's own fields."""

    id: str = Field(description="The registry name; every alias names it too.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    aliases: list[str]
    context_length: int
    allows_lora: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(spec: ModelSpec) -> ModelCard:
    released = RELEASED.get(spec.name, RELEASED["mistral-7b-instruct-v0.1"])
    return ModelCard(
        id=spec.name,
        created=int(datetime.combine(released, time(), tzinfo=UTC).timestamp()),
        owned_by=spec.weights.split("/", 1)[0] if "/" in spec.weights else "mbatch",
        aliases=list(spec.aliases),
        context_length=spec.context_length,
        allows_lora=spec.allows_lora,
    )


def model_list() -> ModelList:
    return ModelList(data=[model_card(spec) for spec in MODELS])


# What the OpenAPI document shows of the answers (`response_body`).


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost: float = Field(description="In USD, as DeepInfra's.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion`, with `usage.estimated_cost`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    cached: bool | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class TextCompletion(BaseModel):
    """OpenAI's `text_completion`, with `usage.estimated_cost`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage
    cached: bool | None = None
