"""Logprobs as the output lines and the native job show them, on fixed inputs."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from jobs.batches.output_format import output_line
from jobs.models import Job, JobStatus
from jobs.schemas.jobs import job_result
from jobs.tokenizer import TokenLogprob

CONTENT: list[TokenLogprob] = [
    {
        "token": " Hi",
        "logprob": -0.25,
        "bytes": [32, 72, 105],
        "top_logprobs": [
            {"token": " Hi", "logprob": -0.25, "bytes": [32, 72, 105]},
            {"token": " Hello", "logprob": -1.5, "bytes": list(b" Hello")},
        ],
    },
    {
        "token": "\ufffd",
        "logprob": -3.0,
        "bytes": [240],
        "top_logprobs": [
            {"token": "!", "logprob": -0.5, "bytes": [33]},
            {"token": ".", "logprob": -1.0, "bytes": [46]},
        ],
    },
]


def finished_job(**values: Any) -> Job:
    return Job(
        id="job_abc",
        model="tiny-random-mistral",
        status=JobStatus.succeeded,
        custom_id="row-1",
        input={"prompt": "Say", "raw": True},
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason="length",
        cost_input=Decimal(0),
        cost_output=Decimal(0),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
        **values,
    )


def choice(job: Job, endpoint: str) -> dict[str, Any]:
    return output_line(job, " Hi\ufffd", endpoint)["response"]["body"]["choices"][0]  # type: ignore[no-any-return]


def test_a_chat_choice_shows_the_stored_entries_as_content() -> None:
    shown = choice(finished_job(logprobs=CONTENT), "/v1/chat/completions")["logprobs"]
    assert shown == {"content": CONTENT}


def test_a_completion_choice_shows_the_legacy_shape() -> None:
    shown = choice(finished_job(logprobs=CONTENT), "/v1/completions")["logprobs"]
    assert shown == {
        "tokens": [" Hi", "\ufffd"],
        "token_logprobs": [-0.25, -3.0],
        # The best tokens asked for, and the chosen one beside them where it is not one.
        "top_logprobs": [{" Hi": -0.25, " Hello": -1.5}, {"!": -0.5, ".": -1.0, "\ufffd": -3.0}],
        # Offsets into the prompt and the completion that continues it.
        "text_offset": [3, 6],
    }


def test_a_job_that_did_not_ask_shows_none() -> None:
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        assert choice(finished_job(), endpoint)["logprobs"] is None


def test_a_native_result_shows_logprobs_only_where_asked() -> None:
    asked = job_result(finished_job(logprobs=CONTENT), "text").model_dump(mode="json")
    assert asked == {"response": "text", "logprobs": {"content": CONTENT}}
    plain = job_result(finished_job(), "text").model_dump(mode="json")
    assert plain == {"response": "text"}
