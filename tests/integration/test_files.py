"""File uploads over HTTP: limits, ownership, content."""

import re
import urllib.parse
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


def upload_raw_name(client: TestClient, headers: dict[str, str], quoted_name: bytes):  # type: ignore[no-untyped-def]
    """An upload whose multipart `filename` parameter is written byte for byte, as a client
    other than httpx (which percent-escapes quotes and control characters) may send it."""
    boundary = b"mbatch-test-boundary"
    body = b"".join(
        [
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="file"; filename="' + quoted_name + b'"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            b'{"a": 1}\n\r\n',
            b"--" + boundary + b"--\r\n",
        ]
    )
    content_type = "multipart/form-data; boundary=" + boundary.decode()
    return client.post("/v1/files", content=body, headers={**headers, "Content-Type": content_type})


def disposition_filename(header: str) -> str:
    """The name a client reads from a Content-Disposition header: RFC 6266 has it prefer the
    `filename*` parameter, an RFC 5987 ext-value (charset, language, then only attr-chars and
    percent-escapes)."""
    extended = re.search(r"filename\*=([^;\s]*)", header)
    assert extended is not None, header
    charset, _language, value = extended.group(1).split("'")
    assert re.fullmatch(r"([A-Za-z0-9!#$&+.^_`|~-]|%[0-9A-F]{2})*", value), header
    return urllib.parse.unquote(value, encoding=charset, errors="strict")


@pytest.mark.parametrize(
    ("quoted_name", "name"),
    [
        ("数据.jsonl".encode(), "数据.jsonl"),
        ("données été.jsonl".encode(), "données été.jsonl"),
        (b'say \\"hi\\".jsonl', 'say "hi".jsonl'),
        (b"back\\\\slash;x=1.jsonl", "back\\slash;x=1.jsonl"),
        (b"two\nlines.jsonl", "two\nlines.jsonl"),
        (b"100%25 %E6.jsonl", "100%25 %E6.jsonl"),
    ],
    ids=["cjk", "latin-1", "quotes", "backslash", "newline", "percent"],
)
def test_any_file_name_downloads_under_its_own_name(
    small_client: TestClient, alice: dict[str, str], quoted_name: bytes, name: str
) -> None:
    made = upload_raw_name(small_client, alice, quoted_name)
    assert made.status_code == 200, made.text
    assert made.json()["filename"] == name
    content = small_client.get(f"/v1/files/{made.json()['id']}/content", headers=alice)
    assert content.status_code == 200, content.text
    assert content.content == b'{"a": 1}\n'
    header = content.headers["content-disposition"]
    assert disposition_filename(header) == name
    # Clients that know only `filename` get a plain ASCII name that ends its quotes where it
    # should and cannot smuggle a header or parameter in.
    fallback = re.fullmatch(r'attachment; filename="([^"]*)"; filename\*=(\S+)', header)
    assert fallback is not None, header
    assert all(" " <= c <= "~" and c not in '\\"' for c in fallback.group(1)), header


def test_a_file_name_postgres_cannot_hold_is_the_callers_422(
    small_client: TestClient, alice: dict[str, str]
) -> None:
    refused = upload_raw_name(small_client, alice, b"nul\x00name.jsonl")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == "file"
