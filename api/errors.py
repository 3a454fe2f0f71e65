"""The one place where errors become HTTP responses: `{"error": {code, message, param}}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.middleware import BodyTooLarge
from jobs.errors import MbatchError, describe, main_error

log = logging.getLogger(__name__)


def error_response(
    status_code: int, code: str, message: str, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message, "param": param}},
    )


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(400, "invalid_json", f"the body is not valid JSON: {detail}")
    first = main_error(errors)
    param, message = describe(first)
    if param is None and first.get("type") == "missing":
        message = "a JSON body is required"
    elif param is None and first.get("type") in ("model_type", "model_attributes_type"):
        message = "the body must be a JSON object"
    return error_response(422, "invalid_parameter", message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MbatchError)
    async def _domain(_: Request, exc: MbatchError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps it while reading the body
            return error_response(413, "payload_too_large", str(exc.__cause__))
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; the request was not applied")
