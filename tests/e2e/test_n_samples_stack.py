"""`n` samples through the whole stack: a seeded chat batch line with n=3, decoded by the real
worker from one prefill, gives three choices in its output line."""

import pytest
from openai import OpenAI

from tests.conftest import Stack, create_key
from tests.e2e.test_logprobs_stack import line, run_batch

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(stack: Stack) -> OpenAI:
    key = create_key(stack.env, "nico")
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0)


def test_a_chat_line_with_n_3_gives_three_choices(client: OpenAI) -> None:
    body = {
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
    }
    [output] = run_batch(client, CHAT, [line("three", CHAT, **body)])
    response = output["response"]["body"]
    choices = response["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2]
    assert all(choice["message"]["role"] == "assistant" for choice in choices)
    assert len({choice["message"]["content"] for choice in choices}) > 1
    assert response["usage"]["completion_tokens"] >= 3
