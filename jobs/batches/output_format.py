"""The lines of a batch's output and error files, in OpenAI's batch output format: a finished
job's `output_line` (with its `response_body`, a `chat.completion` or `text_completion`) and the
`error_line` of a line that produced no response. Pure functions of a job (or a refused line),
so the format is tested on fixed inputs.
"""

from decimal import Decimal
from typing import Any

from jobs.models import Job
from jobs.schemas.openai import CHAT_ENDPOINT
from jobs.timeutil import aware


def _request_id(job_id: str) -> str:
    return "batch_req_" + job_id.removeprefix("job_")


def chat_logprobs(job: Job) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: the stored entries are OpenAI's `content` already."""
    return None if job.logprobs is None else {"content": job.logprobs}


def completion_logprobs(job: Job) -> dict[str, Any] | None:
    """A completion choice's legacy `logprobs`, from the stored chat entries. As OpenAI's:
    each token's `top_logprobs` holds the best tokens asked for and the chosen one (so up to
    one more), and `text_offset` counts characters from the start of the prompt, which the
    completion continues."""
    if job.logprobs is None:
        return None
    tokens = [entry["token"] for entry in job.logprobs]
    offsets, offset = [], len(job.input.get("prompt", ""))
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = []
    for entry in job.logprobs:
        best = {
            alternative["token"]: alternative["logprob"] for alternative in entry["top_logprobs"]
        }
        best.setdefault(entry["token"], entry["logprob"])
        top.append(best)
    return {
        "tokens": tokens,
        "token_logprobs": [entry["logprob"] for entry in job.logprobs],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def response_body(job: Job, text: str, endpoint: str) -> dict[str, Any]:
    """A `chat.completion` or `text_completion` object, with `usage.estimated_cost`."""
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
    finish = job.finish_reason or "stop"
    suffix = job.id.removeprefix("job_")
    if endpoint == CHAT_ENDPOINT:
        return {
            "id": f"chatcmpl-{suffix}",
            "object": "chat.completion",
            **common,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": chat_logprobs(job),
                }
            ],
        }
    return {
        "id": f"cmpl-{suffix}",
        "object": "text_completion",
        **common,
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": finish,
                "logprobs": completion_logprobs(job),
            }
        ],
    }


def output_line(job: Job, text: str, endpoint: str) -> dict[str, Any]:
    return {
        "id": _request_id(job.id),
        "custom_id": job.custom_id,
        "response": {
            "status_code": 200,
            "request_id": job.id,
            "body": response_body(job, text, endpoint),
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
