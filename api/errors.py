"""The one place where errors become HTTP responses, in the dialect of the request's path
(`api.dialects`): `{"error": {code, message, param, type}}`, or Cloudflare's envelope on the
Workers AI paths."""

import logging
from collections.abc import Mapping

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.dialects import Dialect, dialect_of
from api.dialects.errors import error_content
from api.middleware import BodyTooLarge
from jobs import storage
from jobs.errors import MbatchError, describe, main_error
from jobs.outages import DATABASE_ERRORS, unavailable

log = logging.getLogger(__name__)

# How long a caller is asked to wait after an outage of Postgres or storage: long enough not to
# hammer a service that is coming back, short enough that a blip costs little.
RETRY_AFTER_SECONDS = 5

# What storage raises; `jobs.outages.unavailable` tells its outages from its other errors.
_STORAGE_ERRORS = (storage.StorageUnavailable, BotoCoreError, ClientError)


def error_response(
    dialect: Dialect,
    status_code: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    status_code, content = error_content(dialect, status_code, code, message, param)
    return JSONResponse(status_code=status_code, content=content, headers=headers)


def _dialect(request: Request) -> Dialect:
    return dialect_of(request.scope.get("path", ""))


def _internal(dialect: Dialect, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    message = "internal error; the request was not applied"
    return error_response(dialect, 500, "internal_error", message)


def _unavailable_or_internal(dialect: Dialect, exc: Exception) -> JSONResponse:
    down = unavailable(exc)
    if down is None:
        return _internal(dialect, exc)
    # An outage is the operator's news, not a bug: one line per request, without a trace.
    log.warning("%s is unavailable: %s", down, exc)
    return error_response(
        dialect,
        503,
        "service_unavailable",
        f"{down} is unavailable; try again later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _validation_response(dialect: Dialect, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(dialect, 400, "invalid_json", f"the body is not valid JSON: {detail}")
    first = main_error(errors)
    param, message = describe(first)
    if param is None and first.get("type") == "missing":
        message = "a JSON body is required"
    elif param is None and first.get("type") in ("model_type", "model_attributes_type"):
        message = "the body must be a JSON object"
    return error_response(dialect, 422, "invalid_parameter", message, param)


def _domain_headers(exc: MbatchError) -> dict[str, str]:
    headers = {}
    if exc.status_code == 401:
        # A 401 says which scheme would be accepted (RFC 9110).
        headers["WWW-Authenticate"] = "Bearer"
    job_id = getattr(exc, "job_id", None)
    if job_id is not None:
        # The error of a job that was made (it timed out, failed, was cancelled): its id, to
        # poll; and no automatic retry by an SDK (the OpenAI SDK's retries 5xx), which would
        # run the request again as another job.
        headers["x-mbatch-job-id"] = job_id
        headers["x-should-retry"] = "false"
    return headers


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MbatchError)
    async def _domain(request: Request, exc: MbatchError) -> JSONResponse:
        return error_response(
            _dialect(request),
            exc.status_code,
            exc.code,
            exc.message,
            exc.param,
            _domain_headers(exc),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(_dialect(request), exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        dialect = _dialect(request)
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps it while reading the body
            return error_response(dialect, 413, "payload_too_large", str(exc.__cause__))
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        # Starlette's own headers are kept: a 405 names the methods allowed (`Allow`).
        return error_response(
            dialect,
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=exc.headers,
        )

    async def _outage(request: Request, exc: Exception) -> JSONResponse:
        return _unavailable_or_internal(_dialect(request), exc)

    # Registered by class, outages are answered where they are caught, in the route or in a
    # dependency (the session's authentication included), like any other handled error.
    for error in (*DATABASE_ERRORS, *_STORAGE_ERRORS):
        app.add_exception_handler(error, _outage)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # An outage can also arrive wrapped, as the cause of some other error.
        return _unavailable_or_internal(_dialect(request), exc)
