"""Every bound of the Workers AI schema, and every kind of bad request, over HTTP."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

PROMPT = {"prompt": "Hello there", "max_tokens": 4}
MESSAGES = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}

# (field, just inside, just outside) at each end of each range.
BOUNDS: list[tuple[str, Any, Any]] = [
    ("temperature", 0, -0.001),
    ("temperature", 5, 5.001),
    ("top_p", 0, -0.001),
    ("top_p", 2, 2.001),
    ("top_k", 1, 0),
    ("top_k", 50, 51),
    ("seed", 1, 0),
    ("seed", 9999999999, 10000000000),
    ("repetition_penalty", 0, -0.001),
    ("repetition_penalty", 2, 2.001),
    ("frequency_penalty", 0, -0.001),
    ("frequency_penalty", 2, 2.001),
    ("presence_penalty", 0, -0.001),
    ("presence_penalty", 2, 2.001),
    ("min_p", 0, -0.001),
    ("min_p", 1, 1.001),
    ("max_tokens", 1, 0),
    ("max_tokens", 4096, 4097),  # the tiny model's context
]


def post(client: TestClient, headers: dict[str, str], body: Any, url: str = "/v1/jobs") -> Any:
    # json.dumps escapes lone surrogates (\\ud800), as a hostile client would send them.
    json_headers = {**headers, "Content-Type": "application/json"}
    return client.post(url, content=json.dumps(body), headers=json_headers)


def assert_error(response: Any, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize(("field", "inside", "outside"), BOUNDS)
@pytest.mark.parametrize("base", [PROMPT, MESSAGES], ids=["prompt", "messages"])
def test_bound_inside_passes_and_outside_is_422_naming_the_field(
    client: TestClient,
    alice: dict[str, str],
    base: dict[str, Any],
    field: str,
    inside: Any,
    outside: Any,
) -> None:
    accepted = post(client, alice, {**base, field: inside})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "queued"
    assert_error(post(client, alice, {**base, field: outside}), 422, field)


# 131072 characters that are few enough tokens for the 32k-token model.
LONGEST_TEXT = ("international " * 10000)[:131072]


def test_longest_text_passes(client: TestClient, alice: dict[str, str]) -> None:
    model = {"model": "mistral-7b-instruct-v0.2", "max_tokens": 1}
    assert post(client, alice, {"prompt": LONGEST_TEXT, **model}).status_code == 202
    messages = [{"role": "user", "content": LONGEST_TEXT}]
    assert post(client, alice, {"messages": messages, **model}).status_code == 202


def test_text_over_the_length_limit_is_422(client: TestClient, alice: dict[str, str]) -> None:
    assert_error(post(client, alice, {"prompt": LONGEST_TEXT + "x"}), 422, "prompt")
    too_long = {"messages": [{"role": "user", "content": LONGEST_TEXT + "x"}]}
    assert_error(post(client, alice, too_long), 422, "messages[0].content")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": ""}, 422, "prompt"),
        ({}, 422, "prompt"),
        ({**PROMPT, **MESSAGES}, 422, "messages"),
        ({**PROMPT, "model": "gpt-4"}, 422, "model"),
        ({**MESSAGES, "raw": True}, 422, "raw"),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, 422, "messages[0].content"),
        ({**PROMPT, "unknown_field": 1}, 422, "unknown_field"),
        ({**PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({**PROMPT, "metadata": {f"k{i}": "v" for i in range(17)}}, 422, "metadata"),
        ({**PROMPT, "callback_url": "ftp://example"}, 422, "callback_url"),
        ({**PROMPT, "run_at": "not a date"}, 422, "run_at"),
        ({**PROMPT, "run_at": "0001-01-01T00:00:00+01:00"}, 422, "run_at"),
        ({**PROMPT, "idempotency_key": "a\u0000"}, 422, "idempotency_key"),
        ({**PROMPT, "callback_url": "http://example.com/\u0000"}, 422, "callback_url"),
        ({**PROMPT, "metadata": {"k": "v\u0000"}}, 422, "metadata"),
        ({**PROMPT, "temperature": "hot"}, 422, "temperature"),
        ({**PROMPT, "max_tokens": 1.5}, 422, "max_tokens"),
        # Strict types, as OpenAI and Workers AI have them: no coercion.
        ({**PROMPT, "max_tokens": True}, 422, "max_tokens"),
        ({**PROMPT, "max_tokens": "5"}, 422, "max_tokens"),
        ({**PROMPT, "seed": "42"}, 422, "seed"),
        ({**PROMPT, "raw": "yes"}, 422, "raw"),
        ({**PROMPT, "raw": 1}, 422, "raw"),
        ({**PROMPT, "temperature": "0.5"}, 422, "temperature"),
        ({**PROMPT, "metadata": {"k": 1}}, 422, "metadata.k"),
        # One rule for text: a lone surrogate or a NUL is refused wherever it is.
        ({"prompt": "\ud800"}, 422, "prompt"),
        ({**PROMPT, "stop": "\ud800"}, 422, "stop"),
        ({**PROMPT, "stop": ["ok", "a\u0000"]}, 422, "stop"),
        ({"messages": [{"role": "user", "content": "\udfff"}]}, 422, "messages[0].content"),
        ({**PROMPT, "lora": "a\u0000"}, 422, "lora"),
        ({**PROMPT, "stream": True, "n": 2}, 422, "n"),
        ({**PROMPT, "lora": "no-such-adapter"}, 422, "lora"),
        ({**PROMPT, "model": "mistral-7b-instruct-v0.1-awq", "lora": "x"}, 422, "lora"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            422,
            "messages[1].role",
        ),
        ([1, 2, 3], 422, None),
    ],
)
def test_bad_bodies_get_a_clear_4xx(
    client: TestClient, alice: dict[str, str], body: Any, status: int, param: str | None
) -> None:
    assert_error(post(client, alice, body), status, param)


def test_malformed_json_is_400(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs",
        content=b'{"prompt": "hi",',
        headers={**alice, "Content-Type": "application/json"},
    )
    assert_error(response, 400, None)
    assert response.json()["error"]["code"] == "invalid_json"


def test_oversize_body_is_413(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs",
        content=b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        headers={**alice, "Content-Type": "application/json"},
    )
    assert_error(response, 413, None)


def test_prompt_longer_than_the_context_is_refused(
    client: TestClient, alice: dict[str, str]
) -> None:
    response = post(client, alice, {"prompt": "word " * 5000})
    assert_error(response, 422, "prompt")


def test_aliases_and_the_default_model(client: TestClient, alice: dict[str, str]) -> None:
    assert post(client, alice, PROMPT).json()["model"] == "tiny-random-mistral"
    aliased = post(client, alice, {**PROMPT, "model": "@cf/mistral/mistral-7b-instruct-v0.1"})
    assert aliased.json()["model"] == "mistral-7b-instruct-v0.1"


def test_no_key_is_401_and_a_wrong_key_is_401(client: TestClient) -> None:
    assert_error(client.post("/v1/jobs", json=PROMPT), 401, None)
    assert_error(
        client.post("/v1/jobs", json=PROMPT, headers={"Authorization": "Bearer nope"}), 401, None
    )
    assert_error(client.get("/v1/jobs/job_x"), 401, None)


def test_another_owners_job_is_404(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    job = post(client, alice, PROMPT).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
    assert_error(client.get(f"/v1/jobs/{job['id']}", headers=bob), 404, None)
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob), 404, None)
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"


def test_cancel_and_cancel_again(client: TestClient, alice: dict[str, str]) -> None:
    job = post(client, alice, PROMPT).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice), 409, "id")


def test_idempotency_key_returns_the_same_job(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    first = client.post("/v1/jobs", json=PROMPT, headers={**alice, "Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", json=PROMPT, headers={**alice, "Idempotency-Key": "k-1"})
    in_body = post(client, alice, {**PROMPT, "idempotency_key": "k-1"})
    assert first.json()["id"] == again.json()["id"] == in_body.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other_owner = client.post("/v1/jobs", json=PROMPT, headers={**bob, "Idempotency-Key": "k-1"})
    assert other_owner.json()["id"] != first.json()["id"]


def test_run_at_in_the_future_is_scheduled(client: TestClient, alice: dict[str, str]) -> None:
    job = post(client, alice, {**PROMPT, "run_at": "2999-01-01T00:00:00Z"}).json()
    assert job["status"] == "scheduled"
    assert job["run_at"].startswith("2999-01-01")


def test_openapi_documents_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/healthz"} <= set(
        spec["paths"]
    )
    assert spec["paths"]["/v1/jobs"]["post"]["description"]


def test_json_sent_as_curls_default_form_type_is_read_as_json(
    client: TestClient, alice: dict[str, str]
) -> None:
    response = client.post(
        "/v1/jobs",
        content=b'{"prompt": "hi", "max_tokens": 2}',
        headers={**alice, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 202, response.text
    bare = client.post("/v1/jobs", content=b'{"prompt": "hi", "max_tokens": 2}', headers=alice)
    assert bare.status_code == 202, bare.text


def test_a_body_that_is_not_an_object_says_so(client: TestClient, alice: dict[str, str]) -> None:
    response = post(client, alice, [1, 2, 3])
    assert_error(response, 422, None)
    assert response.json()["error"]["message"] == "the body must be a JSON object"


@pytest.mark.parametrize(
    ("method", "url", "param"),
    [
        ("GET", "/v1/jobs/%00", "path"),
        ("GET", "/v1/jobs/job_%00abc", "path"),
        ("POST", "/v1/jobs/%00/cancel", "path"),
        ("GET", "/v1/batches?after=%00", "after"),
        ("GET", "/v1/batches/%00", "path"),
        ("GET", "/v1/files?purpose=%00", "purpose"),
        ("GET", "/v1/files/%00/content", "path"),
        ("GET", "/v1/loras/%00", "path"),
        ("DELETE", "/v1/loras/%00", "path"),
        ("GET", "/v1/batches?limit=1&after=a%00b", "after"),
    ],
)
def test_nul_in_the_url_is_422_on_every_route(
    client: TestClient, alice: dict[str, str], method: str, url: str, param: str
) -> None:
    assert_error(client.request(method, url, headers=alice), 422, param)


@pytest.mark.parametrize(
    "body",
    [
        {"input_file_id": "file-\u0000", "endpoint": "/v1/chat/completions"},
        {"input_file_id": "file-\ud800", "endpoint": "/v1/chat/completions"},
        {
            "input_file_id": "file-x",
            "endpoint": "/v1/chat/completions",
            "idempotency_key": "\u0000",
        },
        {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "max_cost": "1"},
        {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "dry_run": "true"},
    ],
)
def test_a_batch_body_follows_the_same_text_and_type_rules(
    client: TestClient, alice: dict[str, str], body: dict[str, Any]
) -> None:
    response = post(client, alice, body, "/v1/batches")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] in body


def test_a_405_names_the_allowed_methods_and_a_401_the_scheme(
    client: TestClient, alice: dict[str, str]
) -> None:
    wrong_method = client.delete("/v1/jobs", headers=alice)
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    no_key = client.get("/v1/jobs/job_x")
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
