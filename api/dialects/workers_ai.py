"""Workers AI's shapes: the Cloudflare v4 envelope of an answer and of an error, and the events
of a streamed answer (`data: {"response": "<text>"}` per piece, then `data: [DONE]`)."""

from typing import Any

from pydantic import BaseModel, Field

from api.waiting import Finished
from jobs.schemas.jobs import Usage

# Cloudflare's numeric error codes, for what we answer on its paths (the HTTP status is ours):
#   5006   bad input: the body does not match the input schema (Workers AI's code)  400, 422
#   5007   no such model (Workers AI's)                                              404
#   10000  authentication error (the v4 API's, for a missing or wrong token)        401
#   3006   request too large (Workers AI's)                                          413
#   3007   timeout (Workers AI's): the job did not end in time; it goes on, to poll 504
#   3008   aborted (Workers AI's): the job was cancelled while its caller waited    409
#   3036   account limited (Workers AI's): over the owner's request or queue limits 429
#   3040   out of capacity (Workers AI's): a service the API needs is down          503
#   3043   internal error: the job failed on its worker, or the API did             500, 502
#   7000   no route for that URI (the v4 API's)                                      404
#   7001   method not allowed (the v4 API's)                                         405
_BY_CODE = {"model_not_found": 5007, "job_cancelled": 3008, "job_failed": 3043}
_BY_STATUS = {
    400: 5006,
    401: 10000,
    404: 7000,
    405: 7001,
    409: 3008,
    413: 3006,
    422: 5006,
    429: 3036,
    503: 3040,
    504: 3007,
}


def cloudflare_code(status: int, code: str) -> int:
    """The numeric code of an error we name `code`, answered with `status`."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    return _BY_STATUS.get(status, 5006 if status < 500 else 3043)


def error_envelope(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "result": None,
        "success": False,
        "errors": [{"code": cloudflare_code(status, code), "message": message}],
        "messages": [],
    }


def answer(finished: Finished) -> dict[str, Any]:
    """A finished job's answer, as Workers AI gives it: `result.response` and `result.usage`
    (and our extensions where the job asked for them: `logprobs`, `choices`)."""
    assert finished.public.result is not None  # the caller has checked it succeeded
    result = finished.public.result.model_dump(mode="json")
    if finished.public.usage is not None:
        result["usage"] = finished.public.usage.model_dump()
    return {"result": result, "success": True, "errors": [], "messages": []}


# What the OpenAPI document shows of these shapes.


class WorkersAiResult(BaseModel):
    response: str
    usage: Usage


class WorkersAiResponse(BaseModel):
    """Workers AI's answer, in the Cloudflare v4 envelope."""

    result: WorkersAiResult
    success: bool
    errors: list[Any]
    messages: list[Any]


class CloudflareError(BaseModel):
    code: int = Field(description="Cloudflare's numeric code, e.g. 5006 (bad input), 3007.")
    message: str


class CloudflareErrorResponse(BaseModel):
    """Every error answered on the Workers AI paths, in the Cloudflare v4 envelope."""

    result: None
    success: bool
    errors: list[CloudflareError]
    messages: list[Any]


class ResponseEvents:
    """A streamed answer's events, as Workers AI's: `{"response": "<text>"}` per piece, and a
    last one with no text and the usage (`api.interactive.StreamShape`)."""

    def start(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str) -> dict[str, Any]:
        return {"response": text}

    def end(self, finished: Finished) -> list[dict[str, Any]]:
        """The last event before `[DONE]`: no text, the job's usage."""
        usage = finished.public.usage
        return [{"response": "", "usage": usage.model_dump() if usage is not None else None}]
