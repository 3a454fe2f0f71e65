"""Logprobs on native jobs, against the API and real Postgres: the fields' 422s, and logprobs
recorded once with a result and shown by `GET /v1/jobs/{id}`."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs import queries
from jobs.db import get_session_factory
from jobs.queries import Outcome
from jobs.settings import Settings
from jobs.tokenizer import TokenLogprob
from tests.factories import make_job

PROMPT = {"prompt": "hi", "max_tokens": 4}
# A byte-fallback `<0x00>` token: a NUL in its text, which a JSON column still keeps.
CONTENT: list[TokenLogprob] = [
    {
        "token": "\x00",
        "logprob": -2.5,
        "bytes": [0],
        "top_logprobs": [{"token": " the", "logprob": -0.5, "bytes": list(b" the")}],
    }
]


def post(client: TestClient, headers: dict[str, str], body: Any) -> Any:
    json_headers = {**headers, "Content-Type": "application/json"}
    return client.post("/v1/jobs", content=json.dumps(body), headers=json_headers)


@pytest.mark.parametrize(
    ("values", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_a_bad_value_is_422_naming_the_field(
    client: TestClient, alice: dict[str, str], values: dict[str, Any], param: str
) -> None:
    response = post(client, alice, {**PROMPT, **values})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("values", [{"logprobs": True}, {"logprobs": True, "top_logprobs": 20}])
def test_a_good_value_is_queued(
    client: TestClient, alice: dict[str, str], values: dict[str, Any]
) -> None:
    response = post(client, alice, {**PROMPT, **values})
    assert response.status_code == 202, response.text
    assert response.json()["result"] is None


def test_logprobs_are_recorded_once_and_shown_with_the_result(
    api_settings: Settings, client: TestClient, alice: dict[str, str]
) -> None:
    session = get_session_factory(api_settings.database_url)()
    try:
        job = make_job(session, api_settings, logprobs=True, top_logprobs=1)
        plain = make_job(session, api_settings)
        for current in (job, plain):
            [claim] = queries.claim_batch(session, current.model, "w", 60, 1, first_id=current.id)
            asked = current is job
            outcome = Outcome(1, "length", "x", None, 0, 0, 0.1, CONTENT if asked else None)  # type: ignore[arg-type]
            assert queries.record_success(session, claim, outcome)
            # Recorded once: the same claim records nothing more.
            assert not queries.record_success(session, claim, outcome)
    finally:
        session.close()
    shown = client.get(f"/v1/jobs/{job.id}", headers=alice).json()
    assert shown["result"] == {"response": "x", "logprobs": {"content": CONTENT}}
    assert client.get(f"/v1/jobs/{plain.id}", headers=alice).json()["result"] == {"response": "x"}
