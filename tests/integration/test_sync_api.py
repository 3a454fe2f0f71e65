"""The sync and streaming interfaces over HTTP, with no worker running: what is refused (in each
dialect's own error shape), what times out, and what a job that ends while its caller waits
answers. A job is ended the way a worker ends it (`queries.claim_batch`, then
`record_success` or `record_failure`), from a thread, while the request waits."""

import json
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs import queries
from jobs.batches.lines import InvalidLine, LineChecker
from jobs.db import get_session_factory
from jobs.models import Job, Lane
from jobs.queries import Outcome
from jobs.registry import MODELS
from jobs.service import job_id_for
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from tests import services
from worker.streaming import StreamPublisher

PROMPT = {"prompt": "Hello there", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
TINY = "tiny-random-mistral"
WORKERS_AI_PATHS = [
    f"/ai/run/{TINY}",
    f"/client/v4/accounts/acc123/ai/run/{TINY}",
]
CHAT_PATHS = ["/v1/chat/completions", "/v1/openai/chat/completions"]
COMPLETION_PATHS = ["/v1/completions", "/v1/openai/completions"]


@pytest.fixture(scope="module")
def waiting(api_settings: Settings) -> Iterator[TestClient]:
    """The API with a sync timeout long enough for a job ended from a thread (the module's
    `client` waits 300 s, which only a bug would reach)."""
    settings = api_settings.model_copy(update={"sync_timeout_seconds": 20.0})
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def hurried(api_settings: Settings) -> Iterator[TestClient]:
    """The API with a sync timeout shorter than any job here takes (none runs)."""
    settings = api_settings.model_copy(update={"sync_timeout_seconds": 0.5})
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def cloudflare_error(response: Any, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["result"] is None and body["success"] is False and body["messages"] == []
    [error] = body["errors"]
    assert error["code"] == code, body
    return str(error["message"])


def openai_error(response: Any, status: int, kind: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["param"] == param, error
    return error  # type: ignore[no-any-return]


# --- refused before any job is made ------------------------------------------------------


@pytest.mark.parametrize("path", WORKERS_AI_PATHS)
@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, 10000), ({"Authorization": "Bearer nope"}, 10000)],
    ids=["no-key", "wrong-key"],
)
def test_workers_ai_refuses_a_missing_or_wrong_key_in_cloudflares_envelope(
    client: TestClient, path: str, headers: dict[str, str], code: int
) -> None:
    response = client.post(path, json=PROMPT, headers=headers)
    cloudflare_error(response, 401, code)
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**PROMPT, "temperature": 5.5}, "temperature"),
        ({**PROMPT, "top_k": 51}, "top_k"),
        ({**PROMPT, "raw": "true"}, "raw"),  # strict, as the schema: the seed's own curl sends it
        ({"max_tokens": 4}, "prompt"),
        ({**PROMPT, "callback_url": "https://example.com/hook"}, "callback_url"),
        ({**PROMPT, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
        ({**PROMPT, "stream": True, "n": 2}, "n"),
        ({**PROMPT, "stream": True, "logprobs": True}, "logprobs"),
    ],
)
def test_workers_ai_refuses_bad_input_with_422_and_code_5006(
    client: TestClient, alice: dict[str, str], body: dict[str, Any], param: str
) -> None:
    message = cloudflare_error(
        client.post(WORKERS_AI_PATHS[0], json=body, headers=alice), 422, 5006
    )
    assert param in message


def test_workers_ai_answers_malformed_json_in_its_envelope(
    client: TestClient, alice: dict[str, str]
) -> None:
    headers = {**alice, "Content-Type": "application/json"}
    response = client.post(WORKERS_AI_PATHS[0], content=b'{"prompt": ', headers=headers)
    cloudflare_error(response, 400, 5006)


@pytest.mark.parametrize("model", ["no-such-model", "@cf/meta/llama-3-8b-instruct", ""])
def test_workers_ai_unknown_model_is_a_404_with_code_5007(
    client: TestClient, alice: dict[str, str], model: str
) -> None:
    response = client.post(f"/ai/run/{model}", json=PROMPT, headers=alice)
    cloudflare_error(response, 404, 5007)


def test_workers_ai_method_not_allowed_in_its_envelope(
    client: TestClient, alice: dict[str, str]
) -> None:
    response = client.get(WORKERS_AI_PATHS[0], headers=alice)
    cloudflare_error(response, 405, 7001)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("path", CHAT_PATHS)
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": 2.5}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "presence_penalty": -3}, "presence_penalty"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 4}, "messages"),
        ({**CHAT, "stream": True, "n": 2}, "n"),
        ({**CHAT, "stream": True, "logprobs": True}, "logprobs"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_openai_routes_answer_a_bad_field_with_openais_400(
    client: TestClient, alice: dict[str, str], path: str, body: dict[str, Any], param: str
) -> None:
    # A 400, not a 422: the openai SDK raises BadRequestError for it, with `param` set.
    openai_error(client.post(path, json=body, headers=alice), 400, "invalid_request_error", param)


@pytest.mark.parametrize("path", COMPLETION_PATHS)
def test_a_streamed_completion_refuses_logprobs(
    client: TestClient, alice: dict[str, str], path: str
) -> None:
    body = {**PROMPT, "stream": True, "logprobs": 2}
    openai_error(
        client.post(path, json=body, headers=alice), 400, "invalid_request_error", "logprobs"
    )


@pytest.mark.parametrize("path", [*CHAT_PATHS, *COMPLETION_PATHS])
def test_openai_routes_unknown_model_is_a_404(
    client: TestClient, alice: dict[str, str], path: str
) -> None:
    body = {**(CHAT if "chat" in path else PROMPT), "model": "gpt-4o"}
    error = openai_error(
        client.post(path, json=body, headers=alice), 404, "not_found_error", "model"
    )
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("path", [CHAT_PATHS[0], "/v1/models", "/v1/jobs/job_x"])
def test_a_missing_key_is_openais_authentication_error(client: TestClient, path: str) -> None:
    response = client.get(path) if "chat" not in path else client.post(path, json=CHAT)
    openai_error(response, 401, "authentication_error", None)


def test_the_native_api_keeps_its_422_with_a_type(
    client: TestClient, alice: dict[str, str]
) -> None:
    response = client.post("/v1/jobs", json={**PROMPT, "temperature": 9}, headers=alice)
    openai_error(response, 422, "invalid_request_error", "temperature")
    openai_error(client.get("/v1/jobs/job_nope", headers=alice), 404, "not_found_error", "id")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**PROMPT, "stream": True, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
        ({**PROMPT, "stream": True, "n": 3}, "n"),
        ({**PROMPT, "stream": True, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_a_streamed_native_job_refuses_what_cannot_stream(
    client: TestClient, alice: dict[str, str], body: dict[str, Any], param: str
) -> None:
    openai_error(
        client.post("/v1/jobs", json=body, headers=alice), 422, "invalid_request_error", param
    )


def test_a_batch_line_still_refuses_stream(api_settings: Settings) -> None:
    checker = LineChecker("/v1/chat/completions", api_settings, None)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    result = checker.check(1, json.dumps({**line, "body": {**CHAT, "stream": True}}).encode())
    assert isinstance(result, InvalidLine) and result.param == "body.stream", result
    # Streaming off, or options without it, is what files from other tools hold: still fine.
    for extra in ({"stream": False}, {"stream_options": {"include_usage": True}}):
        checker = LineChecker("/v1/chat/completions", api_settings, None)
        result = checker.check(1, json.dumps({**line, "body": {**CHAT, **extra}}).encode())
        assert not isinstance(result, InvalidLine), result


# --- the model list -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/v1/openai/models"])
def test_the_model_list_is_openais_shape_with_every_registry_entry(
    client: TestClient, alice: dict[str, str], path: str
) -> None:
    response = client.get(path, headers=alice)
    assert response.status_code == 200
    listed = response.json()
    assert listed["object"] == "list"
    assert [model["id"] for model in listed["data"]] == [spec.name for spec in MODELS]
    for model, spec in zip(listed["data"], MODELS, strict=True):
        assert model["object"] == "model" and isinstance(model["created"], int)
        assert model["owned_by"] and model["aliases"] == list(spec.aliases)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b-instruct-v0.2"),
        ("@cf/mistral/mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.1"),
        (TINY, TINY),
    ],
)
def test_one_model_by_any_alias(
    client: TestClient, alice: dict[str, str], name: str, expected: str
) -> None:
    response = client.get(f"/v1/models/{name}", headers=alice)
    assert response.status_code == 200 and response.json()["id"] == expected


def test_an_unknown_model_is_openais_404(client: TestClient, alice: dict[str, str]) -> None:
    response = client.get("/v1/models/gpt-4o", headers=alice)
    assert openai_error(response, 404, "not_found_error", "model")["code"] == "model_not_found"


# --- the timeout ------------------------------------------------------------------------------


def job_row(settings: Settings, job_id: str) -> Job:
    session = get_session_factory(settings.database_url)()
    try:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job
    finally:
        session.close()


@pytest.mark.parametrize(
    ("path", "body", "stream"),
    [
        *[
            (path, body, stream)
            for path, body in (
                (WORKERS_AI_PATHS[0], PROMPT),
                (WORKERS_AI_PATHS[1], PROMPT),
                ("/v1/chat/completions", CHAT),
                ("/v1/openai/completions", PROMPT),
            )
            for stream in (False, True)
        ],
        ("/v1/jobs", PROMPT, True),  # not streamed, a native job is answered at once
    ],
)
def test_a_job_that_does_not_end_in_time_is_a_504_naming_it(
    hurried: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    path: str,
    body: dict[str, Any],
    stream: bool,
) -> None:
    response = hurried.post(path, json={**body, "stream": stream}, headers=alice)
    assert response.status_code == 504, response.text
    job_id = response.headers["x-mbatch-job-id"]
    # The job goes on; an SDK must not send the request again as another job.
    assert response.headers["x-should-retry"] == "false"
    if path.startswith(("/ai", "/client")):
        assert job_id in cloudflare_error(response, 504, 3007)
    else:
        assert job_id in openai_error(response, 504, "api_error", "job_id")["message"]
    job = job_row(api_settings, job_id)
    assert job.status == "queued" and job.lane == Lane.interactive and job.stream == stream
    shown = hurried.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert shown["status"] == "queued"


# --- jobs that end while their caller waits -----------------------------------------------------


class Worker:
    """A worker's part, played through its own claim and record path: take the job named by
    the idempotency key once it is queued, and end it."""

    def __init__(self, settings: Settings, owner: str, key: str) -> None:
        self.settings = settings
        self.job_id = job_id_for(owner, key)
        self.storage = storage_from_settings(settings)
        self.error: BaseException | None = None

    def end_with(self, end: Callable[[Any, Any, Job], None]) -> threading.Thread:
        def run() -> None:
            try:
                session = get_session_factory(self.settings.database_url)()
                try:
                    services.wait_for(
                        lambda: session.get(Job, self.job_id, populate_existing=True) is not None,
                        10,
                        f"job {self.job_id}",
                        interval=0.05,
                    )
                    job = session.get(Job, self.job_id)
                    assert job is not None
                    [claim] = queries.claim_batch(session, job.model, "w", 60, 1, first_id=job.id)
                    assert claim.job.id == self.job_id
                    end(session, claim, job)
                finally:
                    session.close()
            except BaseException as exc:  # shown by the test, not lost in the thread
                self.error = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def succeed(self, text: str, completion_tokens: int = 3) -> threading.Thread:
        def end(session: Any, claim: Any, job: Job) -> None:
            outcome = Outcome(
                completion_tokens,
                "length",
                text,
                None,
                Decimal("0.000001"),
                Decimal("0.000002"),
                0.1,
            )
            assert queries.record_success(session, claim, outcome)

        return self.end_with(end)

    def fail(self) -> threading.Thread:
        def end(session: Any, claim: Any, job: Job) -> None:
            assert queries.record_failure(session, claim, "engine_error", "boom")

        return self.end_with(end)

    def join(self, thread: threading.Thread) -> None:
        thread.join(15)
        if self.error is not None:
            raise self.error


def keyed(alice: dict[str, str], key: str) -> dict[str, str]:
    return {**alice, "Idempotency-Key": key}


def fresh_key() -> str:
    return f"sync-{time.monotonic_ns()}"


def events(response: Any) -> list[Any]:
    """The `data:` payloads of an SSE answer, JSON read but for `[DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    payloads = [line.removeprefix("data: ") for line in lines]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


@pytest.mark.parametrize("path", WORKERS_AI_PATHS)
def test_workers_ai_answers_the_result_in_cloudflares_envelope(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings, path: str
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed("New York is in New York.")
    response = waiting.post(path, json=PROMPT, headers=keyed(alice, key))
    worker.join(thread)
    assert response.status_code == 200, response.text
    assert response.headers["x-mbatch-job-id"] == worker.job_id
    body = response.json()
    prompt_tokens = job_row(api_settings, worker.job_id).prompt_tokens
    assert body == {
        "result": {
            "response": "New York is in New York.",
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 3,
                "total_tokens": prompt_tokens + 3,
            },
        },
        "success": True,
        "errors": [],
        "messages": [],
    }
    shown = waiting.get(f"/v1/jobs/{worker.job_id}", headers=alice).json()
    assert shown["status"] == "succeeded" and shown["cost"]["total"] == pytest.approx(0.000003)


def test_workers_ai_streams_pieces_then_usage_then_done(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed("Hi there")
    response = waiting.post(
        WORKERS_AI_PATHS[1], json={**PROMPT, "stream": True}, headers=keyed(alice, key)
    )
    worker.join(thread)
    assert response.headers["x-mbatch-job-id"] == worker.job_id
    *pieces, last, done = events(response)
    assert done == "[DONE]"
    assert "".join(piece["response"] for piece in pieces) == "Hi there"
    assert last["response"] == "" and last["usage"]["completion_tokens"] == 3
    assert job_row(api_settings, worker.job_id).stream is True


def test_a_native_job_streams_in_the_workers_ai_format(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed("Streamed")
    response = waiting.post("/v1/jobs", json={**CHAT, "stream": True}, headers=keyed(alice, key))
    worker.join(thread)
    *pieces, last, done = events(response)
    assert "".join(piece["response"] for piece in pieces) == "Streamed" and done == "[DONE]"
    job = job_row(api_settings, worker.job_id)
    assert job.lane == Lane.interactive and job.status == "succeeded"


@pytest.mark.parametrize("path", CHAT_PATHS)
def test_a_chat_completion_is_openais_object_with_estimated_cost(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings, path: str
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed("Bonjour")
    response = waiting.post(path, json=CHAT, headers=keyed(alice, key))
    worker.join(thread)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == TINY
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Bonjour"},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["estimated_cost"] == pytest.approx(0.000003)
    assert response.headers["x-mbatch-job-id"] == worker.job_id


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_chat_is_chunks_then_done(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings, include_usage: bool
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed("Bonjour")
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    response = waiting.post("/v1/chat/completions", json=body, headers=keyed(alice, key))
    worker.join(thread)
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    if include_usage:
        *chunks, usage = chunks
        assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 3
        assert usage["usage"]["estimated_cost"] == pytest.approx(0.000003)
        assert all(chunk["usage"] is None for chunk in chunks)
    else:
        assert all("usage" not in chunk for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "Bonjour"
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_a_streamed_completion_is_text_completion_chunks(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.succeed(" upon a time")
    body = {"prompt": "Once", "max_tokens": 4, "stream": True}
    response = waiting.post("/v1/openai/completions", json=body, headers=keyed(alice, key))
    worker.join(thread)
    *chunks, done = events(response)
    assert done == "[DONE]" and {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == " upon a time"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (WORKERS_AI_PATHS[0], PROMPT),
        (WORKERS_AI_PATHS[0], {**PROMPT, "stream": True}),
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
    ],
)
def test_a_job_that_fails_is_a_502_in_the_routes_dialect(
    waiting: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    path: str,
    body: dict[str, Any],
) -> None:
    key = fresh_key()
    worker = Worker(api_settings, "alice", key)
    thread = worker.fail()
    response = waiting.post(path, json=body, headers=keyed(alice, key))
    worker.join(thread)
    assert response.headers["x-mbatch-job-id"] == worker.job_id
    if path.startswith("/ai"):
        assert "boom" in cloudflare_error(response, 502, 3043)
    else:
        assert "boom" in openai_error(response, 502, "api_error", None)["message"]


def test_a_job_cancelled_while_its_caller_waits_is_a_409(
    waiting: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    key = fresh_key()
    job_id = job_id_for("alice", key)

    def cancel() -> None:
        services.wait_for(
            lambda: waiting.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 200,
            10,
            "the cancel",
            interval=0.05,
        )

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    response = waiting.post(WORKERS_AI_PATHS[0], json=PROMPT, headers=keyed(alice, key))
    thread.join(15)
    assert "cancelled" in cloudflare_error(response, 409, 3008)


@pytest.mark.parametrize(
    ("path", "body"),
    [(WORKERS_AI_PATHS[0], PROMPT), ("/v1/chat/completions", CHAT), ("/v1/jobs", PROMPT)],
)
def test_a_stream_that_outlasts_the_timeout_ends_with_an_error_event(
    api_settings: Settings, alice: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    """The worker's own publisher streams two steps' text and never ends the job: the
    answer, started with that text, ends with the timeout in the route's error shape, and
    no `[DONE]`."""
    key = fresh_key()
    job_id = job_id_for("alice", key)
    publisher = StreamPublisher.for_broker(api_settings.broker_url, 60)

    def stream_two_steps(session: Any, claim: Any, job: Job) -> None:
        publisher.start(claim.job, lambda tokens: "ab"[: len(tokens)], [])
        publisher.step([(job_id, [1])])
        publisher.step([(job_id, [1, 2])])

    worker = Worker(api_settings, "alice", key)
    thread = worker.end_with(stream_two_steps)
    settings = api_settings.model_copy(update={"sync_timeout_seconds": 3.0})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post(path, json={**body, "stream": True}, headers=keyed(alice, key))
    worker.join(thread)
    assert response.headers["x-mbatch-job-id"] == job_id
    *shown, last = events(response)
    if path.startswith("/ai"):
        assert [event["response"] for event in shown] == ["a", "b"]
        assert last["success"] is False and last["errors"][0]["code"] == 3007
    elif path == "/v1/jobs":
        assert [event["response"] for event in shown] == ["a", "b"]
        assert last["error"]["code"] == "timeout" and job_id in last["error"]["message"]
    else:
        deltas = [chunk["choices"][0]["delta"] for chunk in shown]
        assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}]
        assert last["error"]["type"] == "api_error" and last["error"]["code"] == "timeout"
    # The job goes on, for its caller to poll.
    assert job_row(api_settings, job_id).status == "running"
