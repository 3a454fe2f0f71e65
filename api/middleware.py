"""ASGI middleware: the body size limit, and JSON bodies sent without a JSON content type."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


def _too_large_body(limit: int) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"the request body is over the {limit}-byte limit",
                "param": None,
            }
        }
    ).encode()


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
            await self._refuse(send, max_bytes)
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
            await self._refuse(send, max_bytes)

    async def _refuse(self, send: Send, max_bytes: int) -> None:
        body = _too_large_body(max_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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
