"""An error's body in each dialect (`api.dialects.Dialect`), whether it is answered as a
response (`api.errors`, the one mapper) or as the last event of a stream that had started."""

from typing import Any

from api.dialects import Dialect
from api.dialects.workers_ai import error_envelope

# OpenAI's `error.type` for each status (its SDK reads `code`, `param` and `type` from the body
# and picks the exception class by status). Every other status is a request error below 500
# and an `api_error` from 500.
OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_type(status: int) -> str:
    return OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_content(
    dialect: Dialect, status: int, code: str, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The status and body an error is answered with in `dialect`."""
    if dialect is Dialect.workers_ai:
        return status, error_envelope(status, code, message)
    if dialect is Dialect.openai and status == 422:
        # OpenAI answers a field out of range with a 400, which its SDK raises as
        # BadRequestError (a 422 would be UnprocessableEntityError).
        status = 400
    error = {"code": code, "message": message, "param": param, "type": openai_type(status)}
    return status, {"error": error}
