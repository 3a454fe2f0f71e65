"""Outages of Postgres and of object storage: every route answers 503 with `Retry-After`, in
the API's error shape, and within seconds; never a 500, never a hang. The caller's own faults
and objects that are really gone keep their 4xx."""

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from api.app import create_app
from jobs.db import get_engine
from jobs.outages import unavailable
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from tests import services
from tests.integration.stored_results import succeeded_job

ANSWER_WITHIN_SECONDS = 12.0


def assert_unavailable(response: Any) -> None:  # httpx's Response, or the TestClient's
    assert response.status_code == 503, (response.status_code, response.text)
    retry_after = response.headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) > 0, response.headers
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and error["message"], error
    assert error["param"] is None


def upload(client: httpx.Client | TestClient, headers: dict[str, str], data: bytes) -> Any:
    return client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=headers
    )


# --- Postgres down ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_database(api_settings: Settings) -> Iterator[TestClient]:
    # Nothing listens on this port: every connection is refused, as when Postgres is down.
    url = f"postgresql+psycopg://postgres@127.0.0.1:{services.free_port()}/mbatch"
    settings = api_settings.model_copy(update={"database_url": url})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/jobs/job_x", None),
        ("POST", "/v1/jobs", {"prompt": "Hello", "max_tokens": 4}),
        ("POST", "/v1/jobs/job_x/cancel", None),
        ("GET", "/v1/files", None),
        ("GET", "/v1/files/file-x", None),
        ("GET", "/v1/files/file-x/content", None),
        ("DELETE", "/v1/files/file-x", None),
        ("GET", "/v1/batches", None),
        ("POST", "/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/completions"}),
        ("GET", "/v1/loras", None),
    ],
)
def test_every_route_is_503_while_the_database_is_down(
    no_database: TestClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    headers = {"Authorization": "Bearer mb_any_key"}
    assert_unavailable(no_database.request(method, path, json=body, headers=headers))


def test_an_upload_is_503_while_the_database_is_down(no_database: TestClient) -> None:
    assert_unavailable(upload(no_database, {"Authorization": "Bearer mb_any_key"}, b"{}\n"))


def test_liveness_does_not_depend_on_the_database(no_database: TestClient) -> None:
    assert no_database.get("/healthz").status_code == 200


def test_a_statement_over_postgres_limits_is_not_an_outage(api_settings: Settings) -> None:
    """Postgres reports "program limit exceeded" in the same error class as an outage; it is
    the statement's fault, and a 503 would have the caller retry it forever."""
    too_many_arguments = ", ".join(["1"] * 101)
    engine = get_engine(api_settings.database_url)
    with pytest.raises(sa_exc.OperationalError) as limit, engine.connect() as connection:
        connection.execute(text(f"SELECT concat({too_many_arguments})"))
    assert unavailable(limit.value) is None
    with pytest.raises(sa_exc.OperationalError) as refused:
        port = services.free_port()
        get_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mbatch").connect()
    assert unavailable(refused.value) == "the database"


@pytest.fixture
def silent_database_api(api_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`mbatch api` on a database host that never answers a connection."""
    port = services.free_port()
    held = blackhole(port)
    env = {
        **os.environ,
        "MBATCH_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{port}/mbatch",
        "MBATCH_BROKER_URL": api_settings.broker_url,
        "MBATCH_STORAGE_URL": f"file://{tmp_path / 'storage'}",
        "MBATCH_MODEL": api_settings.model,
    }
    api, api_url = services.start_api(env, tmp_path)
    yield api_url
    api.kill()  # its request may still be waiting on the connection
    for sock in held:
        sock.close()


def test_a_database_that_does_not_answer_is_503_within_seconds(silent_database_api: str) -> None:
    headers = {"Authorization": "Bearer mb_any_key"}
    with httpx.Client(base_url=silent_database_api, timeout=ANSWER_WITHIN_SECONDS) as client:
        assert_unavailable(client.get("/v1/jobs/job_x", headers=headers))


# --- A local storage folder gone (an unmounted volume) ----------------------------------------


def test_a_storage_folder_that_is_gone_is_503_not_a_missing_object(
    api_settings: Settings, alice: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    settings = api_settings.model_copy(update={"storage_url": f"file://{root}"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        file_id = upload(client, alice, b'{"a": 1}\n').json()["id"]
        job_id, _ = succeeded_job(settings, client.app.state.storage, "kept in storage")  # type: ignore[attr-defined]
        root.rename(tmp_path / "unmounted")

        assert_unavailable(client.get(f"/v1/files/{file_id}/content", headers=alice))
        assert_unavailable(client.get(f"/v1/jobs/{job_id}", headers=alice))
        assert_unavailable(upload(client, alice, b'{"a": 1}\n'))
        assert not root.exists(), "an upload must not make a new, empty storage folder"
        assert_unavailable(client.delete(f"/v1/files/{file_id}", headers=alice))
        # What needs only the database still works, and bad input is still the caller's.
        assert client.get(f"/v1/files/{file_id}", headers=alice).status_code == 200
        assert upload(client, alice, b"").status_code == 422

        (tmp_path / "unmounted").rename(root)
        content = client.get(f"/v1/files/{file_id}/content", headers=alice)
        assert content.status_code == 200 and content.content == b'{"a": 1}\n'
        shutil.rmtree(root)


# --- S3 down: refusing connections, then not answering at all ---------------------------------


@dataclass
class S3Outage:
    api_url: str
    port: int
    file_id: str
    job_id: str
    moto: services.Process
    api: services.Process
    held: list[socket.socket] = field(default_factory=list)


@pytest.fixture(scope="module")
def s3_outage(
    api_settings: Settings, alice: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Outage]:
    """`mbatch api` on a moto server of its own, with a file and a job result kept there;
    the server is then stopped."""
    log_dir = tmp_path_factory.mktemp("s3-outage")
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    moto, s3_url = services.start_s3_server(log_dir)
    settings = api_settings.model_copy(
        update={"storage_url": "s3://mbatch-outage/data", "s3_endpoint_url": s3_url}
    )
    env = {
        **os.environ,
        **aws,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MBATCH_DATABASE_URL": settings.database_url,
        "MBATCH_BROKER_URL": settings.broker_url,
        "MBATCH_STORAGE_URL": settings.storage_url,
        "MBATCH_S3_ENDPOINT_URL": s3_url,
        "MBATCH_MODEL": settings.model,
    }
    api, api_url = services.start_api(env, log_dir)
    with httpx.Client(base_url=api_url) as client:
        made = upload(client, alice, b'{"a": 1}\n')
        assert made.status_code == 200, made.text
    for key, value in aws.items():
        os.environ.setdefault(key, value)
    job_id, _ = succeeded_job(settings, storage_from_settings(settings), "kept in storage")
    moto.stop()
    outage = S3Outage(api_url, int(s3_url.rsplit(":", 1)[1]), made.json()["id"], job_id, moto, api)
    yield outage
    api.stop()
    for sock in outage.held:
        sock.close()


def test_storage_refusing_connections_is_503(s3_outage: S3Outage, alice: dict[str, str]) -> None:
    with httpx.Client(base_url=s3_outage.api_url, timeout=30) as client:
        for request in (
            lambda: client.get(f"/v1/files/{s3_outage.file_id}/content", headers=alice),
            lambda: client.get(f"/v1/jobs/{s3_outage.job_id}", headers=alice),
            lambda: upload(client, alice, b'{"a": 1}\n'),
            lambda: client.delete(f"/v1/files/{s3_outage.file_id}", headers=alice),
        ):
            started = time.monotonic()
            assert_unavailable(request())
            assert time.monotonic() - started < ANSWER_WITHIN_SECONDS
        assert client.get(f"/v1/files/{s3_outage.file_id}", headers=alice).status_code == 200
        assert upload(client, alice, b"").status_code == 422
    assert "Traceback" not in s3_outage.api.output()


class FailingS3(BaseHTTPRequestHandler):
    """An S3 endpoint that is up but failing on its side: every request a 500 InternalError,
    in S3's own XML error shape."""

    BODY = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
        b"<Message>We encountered an internal error. Please try again.</Message></Error>"
    )

    def _fail(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _fail

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_storage_failing_on_its_side_is_503(s3_outage: S3Outage, alice: dict[str, str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", s3_outage.port), FailingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=s3_outage.api_url, timeout=30) as client:
            assert_unavailable(client.get(f"/v1/files/{s3_outage.file_id}/content", headers=alice))
            assert_unavailable(client.get(f"/v1/jobs/{s3_outage.job_id}", headers=alice))
            assert_unavailable(upload(client, alice, b'{"a": 1}\n'))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def blackhole(port: int) -> list[socket.socket]:
    """A listener on `port` whose accept queue is full, so that new connections neither
    complete nor fail, as with a host that is down: the sockets that hold it so."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    held = [listener]
    for _ in range(8):
        probe = socket.socket()
        probe.settimeout(0.5)
        held.append(probe)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            return held
    raise AssertionError("could not fill the listener's accept queue")


def test_storage_that_does_not_answer_is_503_within_seconds(
    s3_outage: S3Outage, alice: dict[str, str]
) -> None:
    s3_outage.held.extend(blackhole(s3_outage.port))
    with httpx.Client(base_url=s3_outage.api_url, timeout=30) as client:
        for request in (
            lambda: client.get(f"/v1/files/{s3_outage.file_id}/content", headers=alice),
            lambda: upload(client, alice, b'{"a": 1}\n'),
        ):
            started = time.monotonic()
            assert_unavailable(request())
            assert time.monotonic() - started < ANSWER_WITHIN_SECONDS
