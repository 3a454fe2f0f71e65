"""Callback URLs over HTTP: a job or batch naming one that is refused is a 422 naming
`callback_url` (the test API has MBATCH_WEBHOOK_ALLOW_PRIVATE off), a public one is taken."""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs.settings import Settings

PROMPT = {"prompt": "Hello there", "max_tokens": 4}
CHAT = "/v1/chat/completions"
LINE = (
    b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}\n'
)

REFUSED = [
    "http://127.0.0.1/hook",
    "http://[::1]/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::ffff:10.0.0.1]/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://localhost:8080/hook",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://user:secret@8.8.8.8/",
    "ftp://8.8.8.8/",
    "http://0177.0.0.1/",
]
ACCEPTED = ["https://8.8.8.8/hook", "https://mbatch-no-such-host.invalid/hook"]


def assert_callback_url_refused(response: Any) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "callback_url", error
    assert error["code"] and error["message"]


@pytest.fixture(scope="module")
def input_file_id(client: TestClient, alice: dict[str, str]) -> str:
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", LINE)},
        data={"purpose": "batch"},
        headers=alice,
    )
    assert uploaded.status_code == 200, uploaded.text
    return uploaded.json()["id"]  # type: ignore[no-any-return]


def test_the_test_api_refuses_private_addresses(api_settings: Settings) -> None:
    assert api_settings.webhook_allow_private is False


@pytest.mark.parametrize("url", REFUSED)
def test_a_job_with_a_refused_callback_url_is_422(
    client: TestClient, alice: dict[str, str], url: str
) -> None:
    response = client.post("/v1/jobs", json={**PROMPT, "callback_url": url}, headers=alice)
    assert_callback_url_refused(response)


@pytest.mark.parametrize("url", ACCEPTED)
def test_a_job_with_a_public_callback_url_is_accepted(
    client: TestClient, alice: dict[str, str], url: str
) -> None:
    response = client.post("/v1/jobs", json={**PROMPT, "callback_url": url}, headers=alice)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("url", REFUSED)
def test_a_batch_with_a_refused_callback_url_is_422_and_not_made(
    client: TestClient, alice: dict[str, str], input_file_id: str, url: str
) -> None:
    before = client.get("/v1/batches", params={"limit": 100}, headers=alice).json()["data"]
    body = {"input_file_id": input_file_id, "endpoint": CHAT, "callback_url": url}
    assert_callback_url_refused(client.post("/v1/batches", json=body, headers=alice))
    after = client.get("/v1/batches", params={"limit": 100}, headers=alice).json()["data"]
    assert [b["id"] for b in after] == [b["id"] for b in before]


@pytest.mark.parametrize("url", ACCEPTED)
def test_a_batch_with_a_public_callback_url_is_accepted(
    client: TestClient, alice: dict[str, str], input_file_id: str, url: str
) -> None:
    body = {"input_file_id": input_file_id, "endpoint": CHAT, "callback_url": url}
    response = client.post("/v1/batches", json=body, headers=alice)
    assert response.status_code == 200, response.text
    assert response.json()["callback_url"] == url
