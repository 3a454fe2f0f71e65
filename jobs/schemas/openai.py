"""OpenAI-format request bodies (chat completions and completions), as batch lines and the
sync routes (`POST /v1/chat/completions`, `POST /v1/completions`) carry them.

Ranges follow OpenAI and DeepInfra; like the native schema, a body converts itself into the
internal `SamplingParams` through `SamplingParams.resolve`, after its own dialect's rules.
"""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from jobs.errors import InvalidParameter
from jobs.registry import ModelSpec
from jobs.response_format import schema_text
from jobs.sampling import (
    MAX_SAMPLES,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    SAMPLING_FIELDS,
    SamplingParams,
)
from jobs.schemas.base import RequestModel
from jobs.schemas.native import MAX_TEXT_CHARS
from jobs.tokenizer import ChatMessage

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
# OpenAI's limit on the legacy completions `logprobs` (the alternatives per token).
MAX_COMPLETION_LOGPROBS = 5


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class OpenAIMessage(RequestModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="ignore")

    # A last chunk with `usage` (and no choices) before `data: [DONE]`.
    include_usage: bool | None = None


class OpenAIBody(RequestModel):
    """Fields shared by both endpoints; unknown OpenAI fields are ignored, as OpenAI's
    compatible servers do, so existing files run unchanged."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=5)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    # DeepInfra's range: a seed fits a signed 64-bit integer.
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    user: str | None = None
    # Samples of the one prompt, as OpenAI's `choices` (one prefill, seeds per sample).
    n: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = None
    # Answered as server-sent chunks (the sync routes; a batch line cannot stream).
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    lora: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # JSON that follows a schema, enforced while decoding (`jobs.response_format`).
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        schema_text(value)  # raises InvalidParameter naming response_format
        return value

    @model_validator(mode="after")
    def _one_stream(self) -> "OpenAIBody":
        # One text streams: samples and log-probabilities have no place in its chunks.
        if self.stream and self.n is not None and self.n > 1:
            raise InvalidParameter("n", self.n, "one sample streams; ask for n > 1 without stream")
        if self.stream and self.logprob_settings().get("logprobs"):
            raise InvalidParameter("logprobs", "...", "log-probabilities are not streamed")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, spec: ModelSpec) -> SamplingParams:
        # Each endpoint names its logprobs fields its own way (`logprob_settings`).
        values = {name: getattr(self, name, None) for name in SAMPLING_FIELDS}
        # OpenAI's max_completion_tokens replaces max_tokens, which it still accepts.
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        values["response_format"] = schema_text(self.response_format)
        return SamplingParams.resolve(spec, **{**values, **self.logprob_settings()})

    def logprob_settings(self) -> dict[str, Any]:
        """`logprobs` and `top_logprobs` as `SamplingParams` takes them."""
        return {}


class ChatCompletionBody(OpenAIBody):
    messages: Annotated[list[OpenAIMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def logprob_settings(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    def input_record(self) -> dict[str, Any]:
        return {"messages": [{"role": m.role, "content": m.text()} for m in self.messages]}

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.text()) for m in self.messages]


class CompletionBody(OpenAIBody):
    """A completion prompt is text to continue: it is tokenized raw, with no chat template."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    # The legacy field: how many alternatives to show per token, and with them the chosen
    # token's own log-probability (0: that alone).
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    def logprob_settings(self) -> dict[str, Any]:
        if self.logprobs is None:
            return {}
        return {"logprobs": True, "top_logprobs": self.logprobs}

    def input_record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "raw": True}


class BatchLine(RequestModel):
    """One line of an OpenAI batch input file."""

    model_config = ConfigDict(extra="forbid")
    # The body is checked as the endpoint's own request (`parsed_body`).
    checked_elsewhere = frozenset({"body"})

    custom_id: Annotated[str, Field(min_length=1, max_length=512)]
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]

    @model_validator(mode="after")
    def _body_matches_url(self) -> "BatchLine":
        if self.url == CHAT_ENDPOINT and "messages" not in self.body:
            raise InvalidParameter("body.messages", None, "a chat completion needs messages")
        if self.url == COMPLETIONS_ENDPOINT and "prompt" not in self.body:
            raise InvalidParameter("body.prompt", None, "a completion needs a prompt")
        return self

    def parsed_body(self) -> ChatCompletionBody | CompletionBody:
        if self.body.get("stream") is True:
            raise InvalidParameter(
                "stream", True, "a batch line does not stream: its answer goes to the output file"
            )
        if self.url == CHAT_ENDPOINT:
            return ChatCompletionBody.model_validate(self.body)
        return CompletionBody.model_validate(self.body)
