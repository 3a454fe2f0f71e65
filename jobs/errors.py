"""The small vocabulary of errors that cross module boundaries; `api/errors.py` maps them."""

from collections.abc import Sequence
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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: str) -> bool:
    """Pydantic puts the member of a union it tried into `loc`; that is not a field name."""
    return part in _TYPE_TAGS or "[" in part or "-" in part


def field_path(loc: tuple[Any, ...], request: bool = True) -> str:
    """`messages[1].role` from a pydantic error location (of a request: without its leading
    `body`, `query`... part)."""
    path = ""
    for part in loc:
        if request and part in ("body", "query", "path", "header") and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not _is_type_tag(part):
            path += f".{part}" if path else part
    return path


def main_error(errors: Sequence[Any]) -> Any:
    """Of a union's errors, the one about the value (too long, out of range) says more than
    "not a string" from the member it did not match."""
    return next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])


def describe(error: Any, prefix: str | None = None) -> tuple[str | None, str]:
    """The parameter a pydantic error names, and a message that shows the value. With a
    prefix, the location is within that field, not a request."""
    param = field_path(tuple(error.get("loc", ())), request=prefix is None) or None
    if param is not None and prefix:
        param = f"{prefix}.{param}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    message = f"{param}: {error.get('msg')} (got {shown})" if param else str(error.get("msg"))
    return param, message
