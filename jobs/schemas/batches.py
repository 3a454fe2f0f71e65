"""The Files and Batches API's objects, in OpenAI's shapes."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.models import Batch, FileObject
from jobs.schemas.base import Money, RequestModel
from jobs.schemas.native import MAX_METADATA_PAIRS
from jobs.schemas.openai import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT
from jobs.timeutil import unix_seconds


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, file: FileObject) -> "FilePublic":
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=unix_seconds(file.created_at) or 0,
            filename=file.filename,
            purpose=file.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(RequestModel):
    """`POST /v1/batches`: OpenAI's fields, plus mbatch's own after `metadata`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1, max_length=64)]
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: Annotated[dict[str, str], Field(max_length=MAX_METADATA_PAIRS)] | None = None
    callback_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None
    max_cost: Annotated[Money, Field(gt=0, max_digits=20, decimal_places=10)] | None = None
    dry_run: bool = False
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Answer its deterministic lines from the owner's result cache (`jobs.cache`).
    cache: bool = False


ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    # mbatch's own
    callback_url: str | None = None
    max_cost: float | None = None
    retry_of: str | None = None
    usage: dict[str, Any] | None = None
    cache: bool = False

    @classmethod
    def of(cls, batch: Batch) -> "BatchPublic":
        """The batch as its GET returns it: its counts and usage read from its own row."""
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            errors=BatchErrors(data=batch.errors) if batch.errors else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status.value,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=unix_seconds(batch.created_at) or 0,
            in_progress_at=unix_seconds(batch.in_progress_at),
            expires_at=unix_seconds(batch.expires_at),
            finalizing_at=unix_seconds(batch.finalizing_at),
            completed_at=unix_seconds(batch.completed_at),
            failed_at=unix_seconds(batch.failed_at),
            expired_at=unix_seconds(batch.expired_at),
            cancelling_at=unix_seconds(batch.cancelling_at),
            cancelled_at=unix_seconds(batch.cancelled_at),
            request_counts=request_counts(batch),
            metadata=batch.metadata_,
            callback_url=batch.callback_url,
            max_cost=float(batch.max_cost) if batch.max_cost is not None else None,
            retry_of=batch.retry_of,
            usage=usage(batch),
            cache=batch.cache,
        )


def request_counts(batch: Batch) -> RequestCounts:
    """As the batch's files hold them once it has ended; as its lines have ended so far
    before that (the counters on its row)."""
    if batch.status.finished:
        return RequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed)
    return RequestCounts(
        total=batch.total,
        completed=batch.lines_succeeded,
        failed=batch.invalid + batch.lines_failed,
    )


def usage(batch: Batch) -> dict[str, Any]:
    """Tokens and cost of the batch's lines that have succeeded, from the counters on its row."""
    return {
        "prompt_tokens": batch.prompt_tokens,
        "completion_tokens": batch.completion_tokens,
        "total_tokens": batch.prompt_tokens + batch.completion_tokens,
        "estimated_cost": float(batch.cost),
    }


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchEstimate(BaseModel):
    """A dry run: what the batch would cost, counted before anything runs."""

    object: Literal["batch.estimate"] = "batch.estimate"
    input_file_id: str
    endpoint: str
    total_lines: int
    valid_lines: int
    invalid_lines: int
    prompt_tokens: int
    max_completion_tokens: int
    cost: dict[str, Any]
    errors: list[dict[str, Any]]
