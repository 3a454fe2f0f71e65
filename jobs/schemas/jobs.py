"""What the API shows of a job."""

from datetime import datetime

from pydantic import BaseModel, Field

from jobs.models import Job, JobStatus
from jobs.storage import Storage
from jobs.timeutil import aware


class TopLogprobPublic(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobPublic(TopLogprobPublic):
    top_logprobs: list[TopLogprobPublic]


class LogprobsPublic(BaseModel):
    """OpenAI's chat `logprobs`: each generated token, with its best alternatives."""

    content: list[TokenLogprobPublic]


class ChoicePublic(BaseModel):
    """One sample of a job that asked for n > 1."""

    response: str
    finish_reason: str | None


class JobResult(BaseModel):
    response: str
    # Only where the job asked for them: a result is otherwise exactly Workers AI's.
    logprobs: LogprobsPublic | None = Field(default=None, exclude_if=lambda value: value is None)
    # Only where the job asked for n > 1 samples: every one, the response above first.
    choices: list[ChoicePublic] | None = Field(default=None, exclude_if=lambda value: value is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CostPublic(BaseModel):
    currency: str
    input: float
    output: float
    total: float


class ErrorPublic(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    object: str = "job"
    status: JobStatus
    model: str
    lora: str | None
    lora_id: str | None  # the adapter that `lora` named when the job was submitted
    created_at: datetime
    run_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    result: JobResult | None
    usage: Usage | None
    cost: CostPublic | None
    finish_reason: str | None
    # This job's share of its batch's compute time, by tokens.
    compute_seconds: float | None
    error: ErrorPublic | None
    metadata: dict[str, str] | None
    # Answered from the result cache: it never ran, and cost nothing.
    cached: bool = False


RESULT_UNAVAILABLE = "result_unavailable"


def response_text(job: Job, storage: Storage) -> str | None:
    """The response, from the row or, when it was too large for one, from object storage.

    KeyError when its stored object is gone (deleted behind the database's back) or damaged
    (not the UTF-8 it was written as): what that means is the caller's to say.
    StorageUnavailable while the storage is down."""
    if job.response_uri is None:
        return job.response_text
    data = storage.get_bytes(job.response_uri)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise KeyError(job.response_uri) from None


def choice_texts(job: Job, storage: Storage) -> list[str]:
    """The texts of a job's further samples (n > 1), from its row or object storage; raises
    as `response_text` does."""
    texts = []
    for choice in job.choices or []:
        if "text" in choice:
            texts.append(choice["text"])
            continue
        data = storage.get_bytes(choice["uri"])
        try:
            texts.append(data.decode())
        except UnicodeDecodeError:
            raise KeyError(choice["uri"]) from None
    return texts


def job_public(job: Job, storage: Storage) -> JobPublic:
    text: str | None = None
    others: list[str] = []
    error: ErrorPublic | None = None
    if job.status == JobStatus.succeeded:
        try:
            text = response_text(job, storage)
            others = choice_texts(job, storage)
        except KeyError:
            # The job did succeed, and its usage and cost stand; only the text is lost, and
            # that for good, so the job still reads, saying so in place of its result.
            error = ErrorPublic(
                code=RESULT_UNAVAILABLE,
                message="the result of this job is no longer in storage",
            )
    usage = cost = None
    if job.completion_tokens is not None:
        usage = Usage(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            total_tokens=job.prompt_tokens + job.completion_tokens,
        )
    if job.cost_input is not None and job.cost_output is not None:
        cost = CostPublic(
            currency="USD",
            input=float(job.cost_input),
            output=float(job.cost_output),
            total=float(job.cost_input + job.cost_output),
        )
    if job.error_code is not None:
        error = ErrorPublic(code=job.error_code, message=job.error_message or "")
    return JobPublic(
        id=job.id,
        status=job.status,
        model=job.model,
        lora=job.lora,
        lora_id=job.lora_id,
        created_at=aware(job.created_at),  # type: ignore[arg-type]
        run_at=aware(job.run_at),
        started_at=aware(job.started_at),
        finished_at=aware(job.finished_at),
        attempts=job.attempts,
        result=job_result(job, text, others) if text is not None else None,
        usage=usage,
        cost=cost,
        finish_reason=job.finish_reason,
        compute_seconds=job.compute_seconds,
        error=error,
        metadata=job.metadata_,
        cached=bool(job.cached),
    )


def job_result(job: Job, text: str, others: list[str] | None = None) -> JobResult:
    """The result as Workers AI shows it, with logprobs and every sample where asked for."""
    logprobs = None
    if job.logprobs is not None:
        logprobs = LogprobsPublic.model_validate({"content": job.logprobs})
    choices = None
    if job.choices:
        choices = [ChoicePublic(response=text, finish_reason=job.finish_reason)] + [
            ChoicePublic(response=other, finish_reason=stored.get("finish_reason"))
            for stored, other in zip(job.choices, others or [], strict=True)
        ]
    return JobResult(response=text, logprobs=logprobs, choices=choices)
