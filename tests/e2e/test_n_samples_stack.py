"""`n` samples through the whole stack: a seeded chat batch line with n=3, decoded by the real
worker from one prefill, gives three choices in its output line."""

import json
from typing import Any

import pytest
from openai import OpenAI

from tests import services
from tests.conftest import Stack, create_key

MODEL = "tiny-random-mistral"
ENDED = {"completed", "failed", "expired", "cancelled"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(stack: Stack) -> OpenAI:
    key = create_key(stack.env, "nico")
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


def test_a_chat_line_with_n_3_gives_three_choices(client: OpenAI) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
    }
    line = {"custom_id": "three", "method": "POST", "url": CHAT, "body": body}
    uploaded = client.files.create(file=("n.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,  # type: ignore[arg-type]
        completion_window="24h",
    )
    found: dict[str, Any] = {}

    def ended() -> bool:
        found["batch"] = client.batches.retrieve(batch.id)
        return found["batch"].status in ENDED

    services.wait_for(ended, 120, f"batch {batch.id} to end", interval=0.2)
    done = found["batch"]
    errors = client.files.content(done.error_file_id).text if done.error_file_id else ""
    assert done.status == "completed" and done.output_file_id is not None, (
        done.errors,
        done.request_counts,
        errors,
    )
    [output] = [
        json.loads(text) for text in client.files.content(done.output_file_id).text.splitlines()
    ]
    response = output["response"]["body"]
    choices = response["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2]
    assert all(choice["message"]["role"] == "assistant" for choice in choices)
    assert len({choice["message"]["content"] for choice in choices}) > 1
    assert response["usage"]["completion_tokens"] >= 3
