"""The small vocabulary of errors that cross module boundaries; `api/errors.py` maps them."""

from typing import Any


class MbatchError(Exception):
    """Base class: `code` is stable and machine-readable, `message` is for people."""

    code = "error"
    status_code = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameter(MbatchError):
    """A request field that is out of range or inconsistent; names the field and the value."""

    code = "invalid_parameter"
    status_code = 422

    def __init__(self, param: str, value: Any, reason: str) -> None:
        super().__init__(f"{param}={value!r}: {reason}", param=param)
        self.value = value


class NotFound(MbatchError):
    code = "not_found"
    status_code = 404


class Unauthorized(MbatchError):
    code = "unauthorized"
    status_code = 401


class Conflict(MbatchError):
    code = "conflict"
    status_code = 409


class PayloadTooLarge(MbatchError):
    code = "payload_too_large"
    status_code = 413
