"""The native job request: exactly the Workers AI text-generation input schema, plus extensions."""

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

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
from jobs.tokenizer import ChatMessage

MAX_TEXT_CHARS = 131072
MAX_METADATA_PAIRS = 16


class Message(RequestModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class FunctionDef(RequestModel):
    name: str
    code: str


class JobCreate(RequestModel):
    """`POST /v1/jobs`: either `prompt` or `messages`, with Workers AI's sampling fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    raw: bool = False
    lora: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    functions: list[FunctionDef] | None = None
    stream: bool = False

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(ge=0, le=2)] | None = None
    top_k: Annotated[int, Field(ge=1, le=50)] | None = None
    seed: Annotated[int, Field(ge=1, le=9999999999)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=2)] | None = None

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    # As OpenAI's chat: each token's log-probability, and its best alternatives.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # As OpenAI's: this many samples of the one prompt, shown as `result.choices` where n > 1.
    n: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = None
    # As OpenAI's: JSON that follows a schema, enforced while decoding (`jobs.response_format`).
    response_format: dict[str, Any] | None = None
    callback_url: Annotated[str, Field(max_length=2048)] | None = None
    metadata: Annotated[dict[str, str], Field(max_length=MAX_METADATA_PAIRS)] | None = None
    # ISO 8601 text is how JSON carries a time: read it as one.
    run_at: Annotated[datetime, Field(strict=False)] | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Answer it from the owner's result cache where deterministic (`jobs.cache`).
    cache: bool = False

    # Whether `stream: true` is taken: a body answered while its caller waits may stream
    # (`StreamableJobCreate`); one kept to run later (a schedule's job, a file's line) may
    # not, as nobody is there to read its stream.
    can_stream: ClassVar[bool] = False

    @model_validator(mode="after")
    def _one_input(self) -> "JobCreate":
        if self.prompt is None and self.messages is None:
            raise InvalidParameter("prompt", None, "give either prompt or messages")
        if self.prompt is not None and self.messages is not None:
            raise InvalidParameter("messages", "...", "give either prompt or messages, not both")
        if self.messages is not None and self.raw:
            raise InvalidParameter("raw", True, "raw applies to prompt, not to messages")
        if self.functions:
            raise InvalidParameter("functions", "...", "function calling is not supported")
        if self.stream:
            self._check_stream()
        return self

    def _check_stream(self) -> None:
        if not self.can_stream:
            raise InvalidParameter(
                "stream", True, "a job kept to run later does not stream; poll or use a webhook"
            )
        if self.run_at is not None:
            raise InvalidParameter("run_at", str(self.run_at), "a streamed job runs now")
        # One text streams: samples and log-probabilities have no place in its events.
        if self.n is not None and self.n > 1:
            raise InvalidParameter("n", self.n, "one sample streams; ask for n > 1 without stream")
        if self.logprobs:
            raise InvalidParameter("logprobs", True, "log-probabilities are not streamed")
        if self.top_logprobs is not None:
            raise InvalidParameter(
                "top_logprobs", self.top_logprobs, "log-probabilities are not streamed"
            )

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        schema_text(value)  # raises InvalidParameter naming response_format
        return value

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL")
        return value

    @field_validator("run_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if not 2000 <= value.year <= 9998:
            raise ValueError("run_at must be a date between the years 2000 and 9998")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def chat_messages(self) -> list[ChatMessage] | None:
        if self.messages is None:
            return None
        return [ChatMessage(m.role, m.content) for m in self.messages]

    def to_sampling_params(self, spec: ModelSpec) -> SamplingParams:
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        # Workers AI admits repetition_penalty 0; Hugging Face's rule divides by it, so 0
        # means what 1 means there: no penalty (the built-in default).
        if values["repetition_penalty"] == 0:
            values["repetition_penalty"] = None
        values["response_format"] = schema_text(self.response_format)
        return SamplingParams.resolve(spec, **values)

    def input_record(self) -> dict[str, Any]:
        """What the worker needs to rebuild the prompt."""
        if self.messages is not None:
            return {"messages": [m.model_dump() for m in self.messages]}
        return {"prompt": self.prompt, "raw": self.raw}


class StreamableJobCreate(JobCreate):
    """`POST /v1/jobs`: either `prompt` or `messages`, with Workers AI's sampling fields; with
    `stream: true` the job's text is answered as server-sent events while the caller waits."""

    can_stream = True


class WorkersAiInput(StreamableJobCreate):
    """`POST /ai/run/{model}`: the Workers AI input schema (and our extensions), answered while
    the caller waits; the model is the one the path names."""

    @model_validator(mode="after")
    def _answered_now(self) -> "WorkersAiInput":
        # What defers a job makes no sense for an answer the caller waits for.
        for name in ("callback_url", "run_at"):
            if getattr(self, name) is not None:
                raise InvalidParameter(
                    name, str(getattr(self, name)), "/ai/run answers now; use POST /v1/jobs"
                )
        return self
