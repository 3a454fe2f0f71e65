"""The seeds' own interfaces on the live stack, answered while the caller waits: the official
`openai` SDK pointed at `<api>/v1`, and the Workers AI and DeepInfra pages' curl commands run
with only the host and the key changed. Their models (`@cf/mistral/mistral-7b-instruct-v0.1`,
`mistralai/Mistral-7B-Instruct-v0.2`) are served here by workers of those registry names on the
tiny model's weights."""

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests import services
from tests.conftest import Stack, create_key

TINY = "tiny-random-mistral"
SEED_MODELS = ("mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.2")
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def seed_workers(stack: Stack, models_dir: Path) -> Iterator[None]:
    """A worker for each seed page's model, on the tiny model's weights, started together
    (each takes seconds to load)."""
    weights = models_dir / TINY
    workers = [
        services.Process(
            services.mbatch("worker", "--model", model, "--weights", str(weights)),
            stack.env,
            stack.log_dir / f"worker-{model}-{secrets.token_hex(3)}.log",
        )
        for model in SEED_MODELS
    ]
    try:
        for worker in workers:
            services.wait_for(
                lambda: "ready." in worker.output() or not worker.alive(),  # noqa: B023
                120,
                "a seed model's worker",
            )
            assert worker.alive(), worker.output()
        yield
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return create_key(stack.env, "sync-e2e")


@pytest.fixture(scope="module")
def client(stack: Stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0, timeout=120)


def get_job(stack: Stack, key: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.api_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_chat_completion_from_the_sdk_has_usage_and_cost(
    client: OpenAI, stack: Stack, key: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=TINY, messages=CHAT, max_tokens=12, seed=5
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == TINY
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.model_extra or {})["estimated_cost"] > 0
    # An ordinary job: it shows with its usage and cost afterwards.
    job = get_job(stack, key, raw.headers["x-mbatch-job-id"])
    assert job["status"] == "succeeded"
    assert job["result"]["response"] == choice.message.content
    assert job["usage"]["completion_tokens"] == usage.completion_tokens
    assert job["cost"]["total"] == pytest.approx((usage.model_extra or {})["estimated_cost"])


def test_a_streamed_chat_joins_to_the_same_answer(client: OpenAI) -> None:
    request: dict[str, Any] = {
        "model": TINY,
        "messages": CHAT,
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": 11,
    }
    whole = client.chat.completions.create(**request)
    stream = client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    pieces = [chunk.choices[0].delta.content or "" for chunk in text_chunks]
    assert "".join(pieces) == whole.choices[0].message.content
    # The worker streams its steps' text: more than the one piece of a job read at its end.
    assert len([piece for piece in pieces if piece]) > 1
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert whole.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens


def test_a_completion_from_the_sdk(client: OpenAI) -> None:
    completion = client.completions.create(
        model=TINY, prompt="Once upon a time", max_tokens=8, seed=3
    )
    assert completion.object == "text_completion"
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    streamed = client.completions.create(
        model=TINY, prompt="Once upon a time", max_tokens=8, seed=3, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert text == completion.choices[0].text


def test_the_sdk_lists_the_registry(client: OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {TINY, *SEED_MODELS} <= ids
    assert client.models.retrieve("mistralai/Mistral-7B-Instruct-v0.2").id == SEED_MODELS[1]


def test_the_sdk_raises_its_own_errors_with_param(client: OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=TINY, messages=CHAT, temperature=3)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert missing.value.param == "model" and missing.value.code == "model_not_found"
    stranger = OpenAI(base_url=f"{stack.api_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


# --- the seed pages' curl commands, with only the host and the key changed ---------------------

# Verbatim, but for where the lines are split for length (inside the same shell words).
WORKERS_AI_NEW_YORK = (
    "curl -X POST \\\n"
    '"https://api.cloudflare.com/client/v4/accounts/<account>/ai/run/'
    '@cf/mistral/mistral-7b-instruct-v0.1" \\\n'
    '-H "Authorization: Bearer {API_TOKEN}" \\\n'
    '-H "Content-Type:application/json" \\\n'
    """-d '{ "prompt": "where is new york?", "stream": true }'\n"""
)

WORKERS_AI_MESSAGES = (
    "curl https://api.cloudflare.com/client/v4/accounts/{ACCOUNT_ID}/ai/run/"
    "@cf/mistral/mistral-7b-instruct-v0.1 \\\n"
    "-X POST \\\n"
    '-H "Authorization: Bearer {API_TOKEN}" \\\n'
    """-d '{ "stream": true, "messages": [{ "role": "system", "content": "You are a """
    """friendly assistant" }, { "role": "user", "content": "Why is pizza so good?" }]}'\n"""
)

DEEPINFRA_CHAT = """curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
-d '{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'
"""

DEEPINFRA_STREAM = """curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
-d '{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"stream": true,
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'
"""


def run_curl(command: str, stack: Stack, key: str) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = (
        command.replace("https://api.cloudflare.com", stack.api_url)
        .replace("https://api.deepinfra.com", stack.api_url)
        .replace("{API_TOKEN}", key)
    )
    env = {**os.environ, "DEEPINFRA_TOKEN": key}
    done = subprocess.run(
        ["bash", "-c", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def sse_payloads(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines), output
    return [line.removeprefix("data: ") for line in lines]


@pytest.mark.parametrize("command", [WORKERS_AI_NEW_YORK, WORKERS_AI_MESSAGES], ids=["ny", "msgs"])
@pytest.mark.usefixtures("seed_workers")
def test_the_workers_ai_pages_streams(command: str, stack: Stack, key: str) -> None:
    *events, done = sse_payloads(run_curl(command, stack, key))
    assert done == "[DONE]"
    parsed = [json.loads(event) for event in events]
    assert all(isinstance(event["response"], str) for event in parsed)
    assert sum(1 for event in parsed if event["response"]) > 1
    assert parsed[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.usefixtures("seed_workers")
def test_the_deepinfra_pages_chat(stack: Stack, key: str) -> None:
    answer = json.loads(run_curl(DEEPINFRA_CHAT, stack, key))
    assert answer["object"] == "chat.completion"
    assert answer["model"] == SEED_MODELS[1]
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["estimated_cost"] > 0

    *chunks, done = sse_payloads(run_curl(DEEPINFRA_STREAM, stack, key))
    assert done == "[DONE]"
    parsed = [json.loads(chunk) for chunk in chunks]
    assert {chunk["object"] for chunk in parsed} == {"chat.completion.chunk"}
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# --- a caller who goes away ----------------------------------------------------------------------


def test_a_caller_who_disconnects_cancels_its_job(client: OpenAI, stack: Stack, key: str) -> None:
    body = {
        "model": TINY,
        "messages": CHAT,
        # Long enough to be decoding still when the caller goes.
        "max_tokens": 3000,
        "stream": True,
        "seed": 1,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{stack.api_url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        job_id = response.headers["x-mbatch-job-id"]
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    gone = time.monotonic()
    services.wait_for(
        lambda: get_job(stack, key, job_id)["status"] == "cancelled",
        2,
        f"job {job_id} to be cancelled",
        interval=0.05,
    )
    assert time.monotonic() - gone < 2
    # The worker goes on with other work.
    after = client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=4)
    assert after.choices[0].message.content is not None
