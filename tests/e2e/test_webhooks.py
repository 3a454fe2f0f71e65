"""Webhooks through the whole stack: `mbatch api`, a GPU worker on the tiny model and
`mbatch webhooks` as separate processes, delivering to an HTTP receiver of the test's own on
127.0.0.1, verified with the receivers' own library (`standardwebhooks`)."""

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import services
from tests.conftest import Stack, create_key
from tests.receiver import Receiver

CHAT = "/v1/chat/completions"


@dataclass
class Hooks:
    env: dict[str, str]
    log_dir: Path
    api_url: str
    delivery: services.Process

    def restart_delivery(self) -> None:
        self.delivery.kill()
        self.delivery = services.start_webhooks(self.env, self.log_dir)


@pytest.fixture(scope="module")
def hooks(stack: Stack, log_dir: Path) -> Iterator[Hooks]:
    """The shared stack's GPU worker runs the jobs. An API of this module's own lets callbacks
    go to 127.0.0.1 (the shared one keeps the real address check, which the fuzz test
    exercises), and the delivery worker retries on SPEC's schedule shrunk a thousandfold:
    0, 5 ms, 0.3 s, 1.8 s, 7.2 s, 18 s, 36 s, 36 s."""
    env = {
        **stack.env,
        "MBATCH_WEBHOOK_ALLOW_PRIVATE": "true",
        "MBATCH_WEBHOOK_RETRY_SCALE": "0.001",
    }
    api, api_url = services.start_api(env, log_dir)
    delivery = services.start_webhooks(env, log_dir)
    running = Hooks(env, log_dir, api_url, delivery)
    yield running
    running.delivery.stop()
    api.stop()


@dataclass
class Owner:
    headers: dict[str, str]
    secret: str


def new_owner(hooks: Hooks, name: str) -> Owner:
    headers = {"Authorization": f"Bearer {create_key(hooks.env, name)}"}
    answer = httpx.get(f"{hooks.api_url}/v1/webhooks/secret", headers=headers)
    assert answer.status_code == 200, answer.text
    return Owner(headers, answer.json()["secret"])


def submit_job(hooks: Hooks, owner: Owner, url: str, prompt: str = "Hello") -> str:
    body = {"prompt": prompt, "max_tokens": 4, "callback_url": url}
    answer = httpx.post(f"{hooks.api_url}/v1/jobs", json=body, headers=owner.headers)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]  # type: ignore[no-any-return]


def events(hooks: Hooks, owner: Owner, **params: Any) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{hooks.api_url}/v1/webhooks/events",
        params={"limit": 100, **params},
        headers=owner.headers,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]  # type: ignore[no-any-return]


def get(hooks: Hooks, owner: Owner, path: str) -> dict[str, Any]:
    answer = httpx.get(f"{hooks.api_url}{path}", headers=owner.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_a_job_and_a_batch_each_deliver_one_signed_event(hooks: Hooks) -> None:
    owner = new_owner(hooks, "hooks-a")
    with Receiver() as receiver:
        job_id = submit_job(hooks, owner, receiver.url)
        line = {
            "custom_id": "one",
            "method": "POST",
            "url": CHAT,
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        }
        uploaded = httpx.post(
            f"{hooks.api_url}/v1/files",
            files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
            data={"purpose": "batch"},
            headers=owner.headers,
        )
        assert uploaded.status_code == 200, uploaded.text
        made = httpx.post(
            f"{hooks.api_url}/v1/batches",
            json={
                "input_file_id": uploaded.json()["id"],
                "endpoint": CHAT,
                "completion_window": "24h",
                "callback_url": receiver.url,
            },
            headers=owner.headers,
        )
        assert made.status_code == 200, made.text
        batch_id = made.json()["id"]
        services.wait_for(lambda: len(receiver.snapshot()) >= 2, 60, "two deliveries")
        time.sleep(1.5)  # time for a second delivery of either, were there to be one
        got = receiver.snapshot()
    assert len(got) == 2
    bodies = {body["data"]["id"]: body for body in (g.verify(owner.secret) for g in got)}
    assert {g.event_id for g in got} == {body["id"] for body in bodies.values()}
    job_event, batch_event = bodies[job_id], bodies[batch_id]
    assert job_event["type"] == "job.succeeded" and batch_event["type"] == "batch.completed"
    # The object exactly as its GET returns it (the job's result read back from S3).
    assert job_event["data"] == get(hooks, owner, f"/v1/jobs/{job_id}")
    assert batch_event["data"] == get(hooks, owner, f"/v1/batches/{batch_id}")
    assert job_event["data"]["result"]["response"]


def test_a_receiver_that_fails_twice_gets_three_attempts_of_one_event(hooks: Hooks) -> None:
    owner = new_owner(hooks, "hooks-b")
    with Receiver(answer=lambda _, n: 500 if n < 2 else 200) as receiver:
        job_id = submit_job(hooks, owner, receiver.url)

        def delivered() -> bool:
            [event] = events(hooks, owner, object_id=job_id)
            return event["status"] == "delivered"  # type: ignore[no-any-return]

        services.wait_for(delivered, 60, "the event delivered")
        got = receiver.snapshot()
    assert len(got) == 3
    assert len({g.event_id for g in got}) == 1 and len({g.body for g in got}) == 1
    for g in got:
        g.verify(owner.secret)
    [event] = events(hooks, owner, object_id=job_id)
    assert event["id"] == got[0].event_id and event["type"] == "job.succeeded"
    assert [(a["number"], a["status_code"]) for a in event["attempts"]] == [
        (1, 500),
        (2, 500),
        (3, 200),
    ]
    assert all(a["latency_ms"] is not None and a["at"] for a in event["attempts"])


def test_a_receiver_down_while_fifty_jobs_finish_gets_every_event_once(hooks: Hooks) -> None:
    owner = new_owner(hooks, "hooks-c")
    receiver = Receiver()
    receiver.stop()  # down: its port refuses connections
    try:
        job_ids = {submit_job(hooks, owner, receiver.url, f"Question {n}?") for n in range(50)}

        def all_tried() -> bool:
            listed = events(hooks, owner)
            return len(listed) == 50 and all(e["attempts"] for e in listed)

        services.wait_for(all_tried, 90, "50 events tried against a receiver that is down")
        receiver.restart()

        def all_delivered() -> bool:
            return all(e["status"] == "delivered" for e in events(hooks, owner))

        services.wait_for(all_delivered, 60, "50 events delivered")
        time.sleep(1)
        got = receiver.snapshot()
    finally:
        receiver.stop()
    counts = Counter(g.event_id for g in got)
    assert len(counts) == 50 and set(counts.values()) == {1}, counts
    assert {g.verify(owner.secret)["data"]["id"] for g in got} == job_ids
    for event in events(hooks, owner):
        *refused, last = event["attempts"]
        assert refused and all(a["status_code"] is None and a["error"] for a in refused)
        assert last["status_code"] == 200


def test_a_delivery_worker_killed_mid_delivery_loses_no_event(hooks: Hooks) -> None:
    owner = new_owner(hooks, "hooks-d")
    with Receiver(delay=2.0) as receiver:
        job_id = submit_job(hooks, owner, receiver.url)
        services.wait_for(lambda: bool(receiver.snapshot()), 60, "the first delivery to start")
        # The POST is under way (the receiver takes 2 s to answer): the worker dies on it.
        hooks.restart_delivery()

        def delivered() -> bool:
            [event] = events(hooks, owner, object_id=job_id)
            return event["status"] == "delivered"  # type: ignore[no-any-return]

        # Its claim's lease (40 s) lapses, and the event is published again.
        services.wait_for(delivered, 75, "the event delivered after the crash")
        got = receiver.snapshot()
    assert len(got) == 2 and got[0].event_id == got[1].event_id
    assert got[0].body == got[1].body
    got[1].verify(owner.secret)
    [event] = events(hooks, owner, object_id=job_id)
    assert [a["status_code"] for a in event["attempts"]] == [200]
