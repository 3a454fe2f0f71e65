"""Schemathesis against a live `mbatch api`, from its own /openapi.json: every operation on its
own (examples, boundary values, random and invalid data), then chains of operations that feed
each other's ids. No request may get a 5xx, and every answer must be what the document says:
its status, content type, headers and body schema."""

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import GenerationMode

from tests import services
from tests.conftest import create_key

# Small enough for a 2-core CI runner (a minute or two); raise them for a deeper run before
# a release.
EXAMPLES = int(os.environ.get("MBATCH_FUZZ_EXAMPLES", "50"))
SCENARIOS = int(os.environ.get("MBATCH_FUZZ_SCENARIOS", "100"))
STEPS = 8
POSITIVE = GenerationMode.POSITIVE
RESTARTS = 3
SEED = 20260101
# Uploads are fuzzed for their shape, not their size: the size limits have tests of their own.
MAX_UPLOAD_BYTES = 16 * 1024
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    # Invalid data (a "5" for an integer, a missing field) is refused with a 4xx.
    "negative_data_rejection",
    # Every keyed operation, asked without the key and with a wrong one, answers 401.
    "ignored_auth",
    # In chains: what was created can be read; what was deleted cannot.
    "ensure_resource_availability",
    "use_after_free",
    # Every other method on a route is a 405 that names the allowed ones.
    "unsupported_method",
]


@dataclass
class LiveApi:
    url: str
    key: str
    log_path: Path


@pytest.fixture(scope="module")
def live_api(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApi]:
    """An API process of its own, so that its access log holds this module's requests only.
    No worker: jobs stay queued, and the API's side is what is fuzzed."""
    log_dir = tmp_path_factory.mktemp("fuzz")
    # With no worker, a sync or streamed request waits out the sync timeout (a 504): short,
    # so that the fuzzer's many valid ones take a fraction of a second each.
    env = {**stack_env, "MBATCH_SYNC_TIMEOUT_SECONDS": "0.2"}
    process, url = services.start_api(env, log_dir)
    yield LiveApi(url, create_key(stack_env, "fuzz"), log_dir / "api.log")
    process.stop()


def statuses(log_path: Path) -> Counter[int]:
    """The status of every request uvicorn logged."""
    pattern = re.compile(r'"[A-Z]+ \S* HTTP/[\d.]+" (\d{3})')
    return Counter(int(m.group(1)) for m in pattern.finditer(log_path.read_text(errors="replace")))


@pytest.fixture(scope="module", autouse=True)
def traffic(
    live_api: LiveApi, request: pytest.FixtureRequest, record_testsuite_property: Any
) -> Iterator[None]:
    """Count the requests the fuzzer sent as the server saw them (the checks' own requests
    included), for the release note; and fail on any 5xx, whichever request got it."""
    before = statuses(live_api.log_path)
    yield
    sent = statuses(live_api.log_path) - before
    total = sum(sent.values())
    record_testsuite_property("fuzz_requests", total)
    line = f"fuzz: {total} requests sent; by status {dict(sorted(sent.items()))}"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")
    server_errors = {status: n for status, n in sent.items() if status >= 500}
    assert not server_errors, f"{line}; see {live_api.log_path}"


# --- what the document cannot say --------------------------------------------------------
# JSON Schema cannot say "prompt or messages, not both", which names are models, or which
# purpose a file needs, so nearly every generated body is a 422 and the chains behind the
# create operations never start. Each body below is offered as generated or repaired, half
# and half, so both the refusals and the deeper states are reached.

JOB_FIELDS = {
    "prompt",
    "raw",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "min_p",
    "stop",
    "metadata",
    "idempotency_key",
}
BATCH_LINE = {
    "custom_id": "fuzz-1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
}


def repair_job(body: dict[str, Any]) -> dict[str, Any]:
    job = {name: value for name, value in body.items() if name in JOB_FIELDS}
    job["prompt"] = job.get("prompt") or "Hello"
    return job


def repair_file(body: dict[str, Any]) -> dict[str, Any]:
    # One good line for the batch to run, then what was generated, as lines that fail alone;
    # of the type generated, so that schemathesis still judges the body valid.
    line = json.dumps(BATCH_LINE) + "\n"
    junk = body.get("file")
    if isinstance(junk, bytes):
        content: str | bytes = line.encode() + junk
    else:
        content = line + (junk if isinstance(junk, str) else "")
    return {**body, "purpose": "batch", "file": content}


def repair_batch(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "callback_url": None, "max_cost": None}


REPAIRS: dict[tuple[str, str], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("POST", "/v1/jobs"): repair_job,
    ("POST", "/v1/files"): repair_file,
    ("POST", "/v1/batches"): repair_batch,
}


# This API has no worker, so a valid sync or streamed request would wait out the sync timeout
# and answer 504 (`tests/e2e/test_sync_stack.py` covers the wait). What is fuzzed of those
# routes is what they refuse: a valid body goes to a model nobody serves (a 404 in the route's
# own dialect), and a valid native job does not stream.
UNSERVED = "no-such-model"


def unserved_path(case: schemathesis.Case) -> None:
    case.path_parameters = {**(case.path_parameters or {}), "model": UNSERVED}


def unserved_body(case: schemathesis.Case) -> None:
    assert isinstance(case.body, dict)
    case.body = {**case.body, "model": UNSERVED}


def not_streamed(case: schemathesis.Case) -> None:
    assert isinstance(case.body, dict)
    case.body = {**case.body, "stream": False}


NO_WAIT: dict[tuple[str, str], Callable[[schemathesis.Case], None]] = {
    ("POST", "/ai/run/{model}"): unserved_path,
    ("POST", "/v1/chat/completions"): unserved_body,
    ("POST", "/v1/completions"): unserved_body,
    ("POST", "/v1/jobs"): not_streamed,
}


def no_wait(case: schemathesis.Case) -> None:
    """Just before a call, whatever phase made the case (the coverage phase's are not
    mapped by `flatmap_case`): a valid case of the routes above made one that waits not."""
    change = NO_WAIT.get((case.method.upper(), case.path))
    valid = case.meta is not None and case.meta.generation.mode == POSITIVE
    if change is not None and valid and isinstance(case.body, dict):
        change(case)


UPLOADS = {("POST", "/v1/files"), ("POST", "/v1/loras")}


def bound_uploads(body: dict[str, Any]) -> dict[str, Any]:
    # A form's fields have no maxLength, so a shorter one is as valid (or invalid) as it was.
    return {
        name: value[:MAX_UPLOAD_BYTES] if isinstance(value, (bytes, str)) else value
        for name, value in body.items()
    }


def flatmap_case(context: schemathesis.HookContext, case: schemathesis.Case) -> Any:
    key = (case.method.upper(), case.path)
    body = case.body
    if not isinstance(body, dict):
        return st.just(case)
    if key in UPLOADS:
        body = case.body = bound_uploads(body)
    repair = REPAIRS.get(key)
    # Only valid cases are repaired: an invalid one must stay invalid, to be refused.
    if repair is None or case.meta is None or case.meta.generation.mode != POSITIVE:
        return st.just(case)

    def repaired(yes: bool) -> schemathesis.Case:
        if yes:
            case.body = repair(body)
        return case

    return st.booleans().map(repaired)


def with_links(document: dict[str, Any]) -> dict[str, Any]:
    """The live document, plus the one chain schemathesis does not infer: an uploaded file
    is a batch's `input_file_id`."""
    responses = document["paths"]["/v1/files"]["post"]["responses"]
    responses["200"]["links"] = {
        "CreateBatch": {
            "operationRef": "#/paths/~1v1~1batches/post",
            "requestBody": {"input_file_id": "$response.body#/id"},
        }
    }
    return document


def seed_objects(api: LiveApi) -> None:
    """A file, a running batch, a cancelled one, a job, a cancelled job with a callback (so an
    event) and two schedules, made as a client makes them: what the lists return gives the
    chains ids to follow from their first step."""
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30
    ) as client:
        content = json.dumps(BATCH_LINE).encode() + b"\nnot json\n"
        files = {"file": ("seed.jsonl", content)}
        file = client.post("/v1/files", files=files, data={"purpose": "batch"}).raise_for_status()
        batch = {"input_file_id": file.json()["id"], "endpoint": "/v1/chat/completions"}
        for _ in range(2):
            created = client.post("/v1/batches", json=batch).raise_for_status().json()
        client.post(f"/v1/batches/{created['id']}/cancel").raise_for_status()
        client.post("/v1/jobs", json={"prompt": "Hello", "max_tokens": 4}).raise_for_status()
        # A job with a callback, cancelled: its event gives the webhook routes a real id.
        hooked = {"prompt": "Hello", "max_tokens": 4, "callback_url": "https://example.com/fuzz"}
        job = client.post("/v1/jobs", json=hooked).raise_for_status().json()
        client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        schedules = (
            {"name": "job", "cron": "0 9 * * *", "job": {"prompt": "Hello", "max_tokens": 4}},
            {"name": "batch", "cron": "0 9 * * 1", "batch": batch},
        )
        for schedule in schedules:
            client.post("/v1/schedules", json=schedule).raise_for_status()


@pytest.fixture(scope="module")
def fuzz_schema(live_api: LiveApi) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": live_api.url,
            "request-timeout": 30,
            "auth": {"openapi": {"ApiKey": {"bearer": live_api.key}}},
            "generation": {
                "max-examples": EXAMPLES,
                "deterministic": True,
                # No example database: a run is the same on a clean CI runner as on a laptop.
                "database": "none",
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            # Chains are for reaching deep states: their steps are valid requests. Invalid
            # ones are what each operation's own test sends, half of its cases.
            "phases": {
                "stateful": {"max-steps": STEPS, "generation": {"mode": "positive"}},
            },
        }
    )
    seed_objects(live_api)
    document = httpx.get(live_api.url + "/openapi.json").raise_for_status().json()
    schema = schemathesis.openapi.from_dict(with_links(document), config=config)
    schema.hook(flatmap_case)
    return schema


@pytest.fixture(autouse=True)
def _pytest9_node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32 reads `node._nodeid`, which pytest 9.2 no longer has (it keeps `_id`).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
def test_operation(case: schemathesis.Case) -> None:
    no_wait(case)
    case.call_and_validate()


def test_chains_of_operations(fuzz_schema: Any) -> None:
    """E.g. POST /v1/files -> POST /v1/batches -> GET, cancel, retry the batch; POST
    /v1/jobs -> GET, cancel it twice (409)."""

    class Chains(fuzz_schema.as_state_machine()):  # type: ignore[misc]
        scenarios = 0

        def before_call(self, case: schemathesis.Case) -> None:
            no_wait(case)
            super().before_call(case)

        def teardown(self) -> None:
            type(self).scenarios += 1
            super().teardown()

    configured = fuzz_schema.config.get_hypothesis_settings(phase="stateful")
    # Generation only, as schemathesis's own runner does: shrinking replays a scenario
    # against a server whose state has moved on.
    settings = hypothesis.settings(
        configured, max_examples=SCENARIOS, phases=[hypothesis.Phase.generate]
    )
    restarts = 0
    while True:
        try:
            Chains.run(settings=settings)
            break
        except FlakyStrategyDefinition:
            # Which steps can run depends on what the server holds (the ids its lists
            # return grow as the run goes on); Hypothesis takes that for a flaky strategy,
            # not a failure of the API. Go on with a fresh machine, as schemathesis does.
            restarts += 1
            if restarts == RESTARTS:
                break
    print(f"chains: {Chains.scenarios} scenarios, {restarts} restarts")
    assert Chains.scenarios >= SCENARIOS // 2
