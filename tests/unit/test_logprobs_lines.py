"""`logprobs` and `top_logprobs` on batch lines, checked on fixed inputs: both endpoints' own
shapes, and a bad value failing its line alone, with its number and the field it names."""

import io
import json
from typing import Any

import pytest

from jobs.batches.lines import InvalidLine, LineChecker, ValidLine, check_file
from jobs.registry import resolve_model
from jobs.schemas.native import JobCreate
from jobs.settings import Settings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def checker(endpoint: str) -> LineChecker:
    settings = Settings(_env_file=None, model="tiny-random-mistral")  # type: ignore[call-arg]
    return LineChecker(endpoint, settings, adapter_id=None)


def line(endpoint: str, custom_id: str = "row", **body: Any) -> bytes:
    content = (
        {"messages": [{"role": "user", "content": "hi"}]}
        if endpoint == CHAT
        else {"prompt": "Once upon a time"}
    )
    data = {
        "custom_id": custom_id,
        "method": "POST",
        "url": endpoint,
        "body": {**content, "max_tokens": 4, **body},
    }
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("endpoint", "body", "logprobs", "top"),
    [
        (CHAT, {}, False, 0),
        (CHAT, {"logprobs": False}, False, 0),
        (CHAT, {"logprobs": True}, True, 0),
        (CHAT, {"logprobs": True, "top_logprobs": 0}, True, 0),
        (CHAT, {"logprobs": True, "top_logprobs": 20}, True, 20),
        (COMPLETIONS, {}, False, 0),
        (COMPLETIONS, {"logprobs": 0}, True, 0),
        (COMPLETIONS, {"logprobs": 5}, True, 5),
    ],
)
def test_a_line_asks_for_logprobs_in_its_endpoints_shape(
    endpoint: str, body: dict[str, Any], logprobs: bool, top: int
) -> None:
    result = checker(endpoint).check(1, line(endpoint, **body))
    assert isinstance(result, ValidLine), result
    sampling = result.prepared.sampling
    assert (sampling.logprobs, sampling.top_logprobs) == (logprobs, top)


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "body.top_logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": -1}, "body.top_logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": "3"}, "body.top_logprobs"),
        (CHAT, {"logprobs": "yes"}, "body.logprobs"),
        (CHAT, {"logprobs": 1}, "body.logprobs"),
        # As OpenAI: alternatives only beside the chosen tokens' own values.
        (CHAT, {"top_logprobs": 3}, "body.top_logprobs"),
        (CHAT, {"logprobs": False, "top_logprobs": 3}, "body.top_logprobs"),
        (COMPLETIONS, {"logprobs": 6}, "body.logprobs"),
        (COMPLETIONS, {"logprobs": -1}, "body.logprobs"),
        (COMPLETIONS, {"logprobs": True}, "body.logprobs"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(
    endpoint: str, body: dict[str, Any], param: str
) -> None:
    result = checker(endpoint).check(4, line(endpoint, **body))
    assert isinstance(result, InvalidLine), result
    assert (result.line, result.code, result.param) == (4, "invalid_parameter", param)
    assert result.message.startswith("line 4: ")


def test_a_bad_line_fails_alone() -> None:
    data = b"\n".join(
        [
            line(CHAT, "a", logprobs=True, top_logprobs=2),
            line(CHAT, "b", logprobs=True, top_logprobs=21),
            line(CHAT, "c"),
        ]
    )
    results = list(check_file(io.BytesIO(data), checker(CHAT), max_line_bytes=10_000))
    assert [type(result) for result in results] == [ValidLine, InvalidLine, ValidLine]
    refused = results[1]
    assert isinstance(refused, InvalidLine)
    assert (refused.line, refused.custom_id, refused.param) == (2, "b", "body.top_logprobs")


def test_a_native_job_takes_the_chat_fields() -> None:
    spec = resolve_model("tiny-random-mistral")
    body = JobCreate.model_validate({"prompt": "hi", "logprobs": True, "top_logprobs": 4})
    sampling = body.to_sampling_params(spec)
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 4)
    assert not JobCreate.model_validate({"prompt": "hi"}).to_sampling_params(spec).logprobs
