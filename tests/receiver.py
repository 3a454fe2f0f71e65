"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that records every POST
and answers as the test says (a status, after a delay)."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        """The body, if its signature verifies with `secret` (the receivers' own library);
        raises WebhookVerificationError if not."""
        return Webhook(secret).verify(self.body, self.headers)


# Given what came (and how many came before it), the status to answer.
Answer = Callable[[Received, int], int]


class Receiver:
    def __init__(
        self, answer: Answer | None = None, delay: float = 0.0, port: int = 0, body: bytes = b"ok"
    ) -> None:
        self.answer: Answer = answer or (lambda _, __: 200)
        self.delay = delay
        self.body = body
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server = self._serve(port)
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                got = Received({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver._lock:
                    before = len(receiver.received)
                    receiver.received.append(got)
                status = receiver.answer(got, before)
                time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("content-length", str(len(receiver.body)))
                self.end_headers()
                self.wfile.write(receiver.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def stop(self) -> None:
        """Stop listening: deliveries meanwhile find the port closed."""
        self._server.shutdown()
        self._server.server_close()

    def restart(self) -> None:
        """Listen again on the same port."""
        self._server = self._serve(self.port)

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)
