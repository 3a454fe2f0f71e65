"""Logprobs through the whole stack: asked for on a native job and on batch lines of both
endpoints, computed by the real worker, stored with the result and shown in OpenAI's shapes."""

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests import services
from tests.conftest import Stack, create_key

MODEL = "tiny-random-mistral"
ENDED = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return create_key(stack.env, "lena")


@pytest.fixture(scope="module")
def client(stack: Stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


def assert_entries(content: list[dict[str, Any]], tokens: int, top: int) -> None:
    assert len(content) == tokens
    for entry in content:
        assert entry["logprob"] <= 0 and entry["token"] == bytes(entry["bytes"]).decode(
            errors="replace"
        )
        values = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert len(values) == top and values == sorted(values, reverse=True)


def test_a_native_job_shows_its_logprobs(stack: Stack, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "Name a colour.", "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    job = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=headers).json()
    found: dict[str, Any] = {}

    def finished() -> bool:
        found.update(httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}", headers=headers).json())
        return found["status"] in {"succeeded", "failed", "cancelled"}

    services.wait_for(finished, 90, "the job to finish", interval=0.1)
    assert found["status"] == "succeeded", found
    content = found["result"]["logprobs"]["content"]
    # EOS is billed but not a token of the text, so it has no entry.
    eos = found["finish_reason"] == "stop"
    assert_entries(content, found["usage"]["completion_tokens"] - eos, 3)


def run_batch(client: OpenAI, endpoint: str, lines: list[dict[str, Any]]) -> list[Any]:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = client.files.create(file=("logprobs.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    found: dict[str, Any] = {}

    def ended() -> bool:
        found["batch"] = client.batches.retrieve(batch.id)
        return found["batch"].status in ENDED

    services.wait_for(ended, 120, f"batch {batch.id} to end", interval=0.2)
    done = found["batch"]
    assert done.status == "completed" and done.output_file_id is not None, done
    output = client.files.content(done.output_file_id).text
    return sorted((json.loads(line) for line in output.splitlines()), key=lambda x: x["custom_id"])


def line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


def test_chat_lines_show_logprobs_in_the_chat_shape(client: OpenAI) -> None:
    url = "/v1/chat/completions"
    messages = [{"role": "user", "content": "Say hello."}]
    asked = line("a-asked", url, messages=messages, max_tokens=5, logprobs=True, top_logprobs=2)
    plain = line("b-plain", url, messages=messages, max_tokens=5)
    first, second = run_batch(client, url, [asked, plain])
    choice = first["response"]["body"]["choices"][0]
    tokens = first["response"]["body"]["usage"]["completion_tokens"]
    assert_entries(choice["logprobs"]["content"], tokens - (choice["finish_reason"] == "stop"), 2)
    assert second["response"]["body"]["choices"][0]["logprobs"] is None


def test_completion_lines_show_the_legacy_shape(client: OpenAI) -> None:
    url = "/v1/completions"
    prompt = "Once upon a time"
    [result] = run_batch(client, url, [line("a", url, prompt=prompt, max_tokens=5, logprobs=2)])
    choice = result["response"]["body"]["choices"][0]
    logprobs = choice["logprobs"]
    count = len(logprobs["tokens"])
    assert count == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) > 0
    assert logprobs["text_offset"][0] == len(prompt)
    for token, value, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        # The best two and the chosen token; fewer where tokens read the same (byte pieces).
        assert token in top and len(top) <= 3 and value <= max(top.values())
