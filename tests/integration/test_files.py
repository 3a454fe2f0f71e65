"""File uploads over HTTP: limits, ownership, content."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.settings import Settings


@pytest.fixture(scope="module")
def small_client(api_settings: Settings) -> Iterator[TestClient]:
    limits = api_settings.model_copy(update={"max_file_lines": 3, "max_file_bytes": 100})
    with TestClient(create_app(limits), raise_server_exceptions=False) as client:
        yield client


def upload(client: TestClient, headers: dict[str, str], data: bytes, purpose: str = "batch"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose}, headers=headers
    )


def test_upload_show_content_delete(
    small_client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    made = upload(small_client, alice, b'{"a": 1}\n{"b": 2}\n')
    assert made.status_code == 200, made.text
    file = made.json()
    assert file["object"] == "file" and file["bytes"] == 18 and file["purpose"] == "batch"
    content = small_client.get(f"/v1/files/{file['id']}/content", headers=alice)
    assert content.content == b'{"a": 1}\n{"b": 2}\n'
    assert small_client.get(f"/v1/files/{file['id']}", headers=bob).status_code == 404
    assert small_client.delete(f"/v1/files/{file['id']}", headers=alice).json()["deleted"]
    assert small_client.get(f"/v1/files/{file['id']}", headers=alice).status_code == 404


@pytest.mark.parametrize(
    ("data", "purpose", "param"),
    [
        (b"1\n2\n3\n4\n", "batch", "file"),  # over the line limit
        (b"x" * 101, "batch", "file"),  # over the byte limit
        (b"", "batch", "file"),
        (b"1\n", "fine-tune", "purpose"),
    ],
)
def test_files_over_the_limits_are_422(
    small_client: TestClient, alice: dict[str, str], data: bytes, purpose: str, param: str
) -> None:
    response = upload(small_client, alice, data, purpose)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_a_batch_of_an_unknown_file_or_endpoint_is_refused(
    small_client: TestClient, alice: dict[str, str]
) -> None:
    missing = small_client.post(
        "/v1/batches",
        json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"},
        headers=alice,
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "input_file_id"
    wrong = small_client.post(
        "/v1/batches", json={"input_file_id": "x", "endpoint": "/v1/embeddings"}, headers=alice
    )
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "endpoint"
