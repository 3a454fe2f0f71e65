"""The lines of a batch's output and error files, in OpenAI's batch output format: a finished
job's `output_line` (with its `response_body`, a `chat.completion` or `text_completion`) and the
`error_line` of a line that produced no response. Pure functions of a job (or a refused line),
so the format is tested on fixed inputs.

A job that asked for n > 1 samples has n `choices`, index 0 its own result and the others
from `Job.choices`; the texts of those kept in storage are the caller's to read and pass
(`choice_texts`).
"""

from decimal import Decimal
from typing import Any

from jobs.models import Job
from jobs.schemas.openai import CHAT_ENDPOINT
from jobs.timeutil import aware


def _request_id(job_id: str) -> str:
    return "batch_req_" + job_id.removeprefix("job_")


Entries = list[dict[str, Any]] | None


def chat_logprobs(job: Job, entries: Entries = None) -> dict[str, Any] | None:
    """A chat choice's `logprobs` (the job's own, or a further sample's `entries`): the
    stored entries are OpenAI's `content` already."""
    entries = job.logprobs if entries is None else entries
    return None if entries is None else {"content": entries}


def completion_logprobs(job: Job, entries: Entries = None) -> dict[str, Any] | None:
    """A completion choice's legacy `logprobs`, from the stored chat entries (the job's own,
    or a further sample's `entries`). As OpenAI's: each token's `top_logprobs` holds the best
    tokens asked for and the chosen one (so up to one more), and `text_offset` counts
    characters from the start of the prompt, which the completion continues."""
    entries = job.logprobs if entries is None else entries
    if entries is None:
        return None
    tokens = [entry["token"] for entry in entries]
    offsets, offset = [], len(job.input.get("prompt", ""))
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = []
    for entry in entries:
        best = {
            alternative["token"]: alternative["logprob"] for alternative in entry["top_logprobs"]
        }
        best.setdefault(entry["token"], entry["logprob"])
        top.append(best)
    return {
        "tokens": tokens,
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def inline_choice_texts(job: Job) -> list[str]:
    """The texts of a job's further samples, as its row holds them. KeyError for one kept in
    storage, which the caller reads (`jobs.schemas.jobs.choice_texts`)."""
    return [choice["text"] if "text" in choice else _stored(choice) for choice in job.choices or []]


def _stored(choice: dict[str, Any]) -> str:
    raise KeyError(choice["uri"])


def _choice(
    job: Job, index: int, text: str, finish: str, entries: Entries, endpoint: str
) -> dict[str, Any]:
    if endpoint == CHAT_ENDPOINT:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": chat_logprobs(job, entries),
        }
    return {
        "index": index,
        "text": text,
        "finish_reason": finish,
        "logprobs": completion_logprobs(job, entries),
    }


def _choices(job: Job, text: str, endpoint: str, others: list[str]) -> list[dict[str, Any]]:
    """Choice 0, the job's own result, then its further samples (n > 1)."""
    choices = [_choice(job, 0, text, job.finish_reason or "stop", job.logprobs, endpoint)]
    for index, (stored, other) in enumerate(zip(job.choices or [], others, strict=True), 1):
        finish = stored.get("finish_reason") or "stop"
        choices.append(_choice(job, index, other, finish, stored.get("logprobs"), endpoint))
    return choices


def response_body(
    job: Job, text: str, endpoint: str, choice_texts: list[str] | None = None
) -> dict[str, Any]:
    """A `chat.completion` or `text_completion` object, with `usage.estimated_cost`; one
    choice per sample, `choice_texts` the further samples' texts (by default as the job's
    row holds them)."""
    others = inline_choice_texts(job) if choice_texts is None else choice_texts
    completion = job.completion_tokens or 0
    cost = (job.cost_input or Decimal(0)) + (job.cost_output or Decimal(0))
    created = aware(job.finished_at or job.created_at)
    assert created is not None
    common = {
        "created": int(created.timestamp()),
        "model": job.model,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
            "estimated_cost": float(cost),
        },
    }
    if job.cached:  # mbatch's own: answered from the result cache, at no cost
        common["cached"] = True
    suffix = job.id.removeprefix("job_")
    choices = _choices(job, text, endpoint, others)
    if endpoint == CHAT_ENDPOINT:
        return {
            "id": f"chatcmpl-{suffix}",
            "object": "chat.completion",
            **common,
            "choices": choices,
        }
    return {"id": f"cmpl-{suffix}", "object": "text_completion", **common, "choices": choices}


def output_line(
    job: Job, text: str, endpoint: str, choice_texts: list[str] | None = None
) -> dict[str, Any]:
    return {
        "id": _request_id(job.id),
        "custom_id": job.custom_id,
        "response": {
            "status_code": 200,
            "request_id": job.id,
            "body": response_body(job, text, endpoint, choice_texts),
        },
        "error": None,
    }


def error_line(
    request_id: str,
    custom_id: str | None,
    line: int,
    code: str,
    message: str,
    param: str | None = None,
) -> dict[str, Any]:
    """A line that produced no response: refused at validation, failed, cancelled or expired."""
    return {
        "id": _request_id(request_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "param": param, "line": line},
    }
