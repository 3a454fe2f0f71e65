"""ASGI middleware: the body size limit, JSON bodies sent without a JSON content type, and
text in the URL or headers that nothing could store."""

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.dialects import dialect_of
from api.dialects.errors import error_content


class BodyTooLarge(Exception):
    pass


async def send_error(
    scope: Scope, send: Send, status: int, code: str, message: str, param: str | None = None
) -> None:
    """An error answered from middleware, in the shape of the dialect its path speaks."""
    status, content = error_content(dialect_of(scope.get("path", "")), status, code, message, param)
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """`max_bytes` for every body, but for the upload routes named in `uploads`, which take
    files up to their own limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int]) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.uploads = uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.uploads.get(scope.get("path", ""), self.default_max_bytes)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._refuse(scope, send, max_bytes)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(f"the request body is over the {max_bytes}-byte limit")
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, send, max_bytes)

    async def _refuse(self, scope: Scope, send: Send, max_bytes: int) -> None:
        message = f"the request body is over the {max_bytes}-byte limit"
        await send_error(scope, send, 413, "payload_too_large", message)


class DefaultJsonContentType:
    """Read a body sent without a content type, or as curl's default form type, as JSON.

    `curl -d '{...}'` labels JSON as a form, and the Workers AI examples send it that way;
    multipart uploads keep their type.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
            if content_type in (b"", b"application/x-www-form-urlencoded"):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _nul_in(scope: Scope) -> str | None:
    """The first part of the request (`path`, a query parameter, a header) that holds NUL."""
    if "\x00" in scope.get("path", ""):
        return "path"
    raw_query = scope.get("query_string", b"")
    if b"%00" not in raw_query and b"\x00" not in raw_query:
        raw_query = b""  # the common case: nothing to decode
    for key, value in parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            return key.replace("\x00", "") or "query"
    for name, value in scope.get("headers") or []:
        if b"\x00" in value:
            return name.decode("latin-1")
    return None


class RefuseNul:
    """One rule for every route: a NUL in the path, the query or a header is the caller's
    mistake (422 naming where it is), never text that reaches a query or a row. Postgres
    cannot store NUL; JSON bodies are held to the same rule by their schemas."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (param := _nul_in(scope)) is not None:
            message = f"{param}: must not contain the NUL character"
            await send_error(scope, send, 422, "invalid_parameter", message, param)
            return
        await self.app(scope, receive, send)
