"""Schedules on real processes: two `mbatch beat` at once (and the workers' maintenance
passes) fire a seconds-level cron, and each fire time makes exactly one run and one job, as
Postgres counts them."""

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from jobs.db import session_scope
from jobs.models import Job
from tests import services
from tests.conftest import create_key
from tests.receiver import Receiver

CRON_SECONDS = 2
CRON = f"*/{CRON_SECONDS} * * * * *"
WINDOW_SECONDS = 12
CHAT = "/v1/chat/completions"


def start_beat(env: dict[str, str], log_dir: Path, name: str) -> services.Process:
    proc = services.Process(services.mbatch("beat"), env, log_dir / f"{name}.log")
    time.sleep(0.5)
    if not proc.alive():
        raise RuntimeError(f"{name} exited:\n" + proc.output())
    return proc


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str], log_dir: Path) -> Iterator[dict[str, str]]:
    """The stack's environment on a database and a Redis of the module's own, so that only
    the processes started here fire its schedules (the shared stack's worker would fire them
    too, under its own settings), with schedules allowed to fire every second and callbacks
    to the test's own receiver on 127.0.0.1."""
    from migrations.runner import upgrade

    name = services.create_database()
    database_url = services.database_url(name)
    upgrade(database_url, quiet=True)
    redis_dir = log_dir / "schedules-redis"
    redis_dir.mkdir(exist_ok=True)
    redis, broker_url = services.start_redis_server(redis_dir)
    yield {
        **stack_env,
        "MBATCH_DATABASE_URL": database_url,
        "MBATCH_BROKER_URL": broker_url,
        "MBATCH_SCHEDULE_MIN_INTERVAL_SECONDS": "1",
        "MBATCH_WEBHOOK_ALLOW_PRIVATE": "true",
        "MBATCH_WEBHOOK_RETRY_SCALE": "0.01",
    }
    redis.stop()
    from jobs.db import get_engine

    get_engine(database_url).dispose()
    services.drop_database(name)


@pytest.fixture(scope="module")
def api(env: dict[str, str], log_dir: Path) -> Iterator[str]:
    proc, url = services.start_api(env, log_dir)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def headers(env: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key(env, 'sched')}"}


@pytest.fixture
def beats(env: dict[str, str], log_dir: Path) -> Iterator[list[services.Process]]:
    running = [start_beat(env, log_dir, f"beat-{n}") for n in (1, 2)]
    yield running
    for proc in running:
        proc.stop()


def runs(api: str, headers: dict[str, str], schedule_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(f"{api}/v1/schedules/{schedule_id}/runs", params=params, headers=headers)
        assert page.status_code == 200, page.text
        found += page.json()["data"]
        if not page.json()["has_more"]:
            return found
        after = found[-1]["fire_time"]


def pause(api: str, headers: dict[str, str], schedule_id: str) -> None:
    # The PATCH waits for a fire in progress (it holds the schedule's row): once it answers,
    # no run is made any more.
    paused = httpx.patch(
        f"{api}/v1/schedules/{schedule_id}", json={"paused": True}, headers=headers
    )
    assert paused.status_code == 200, paused.text


def test_two_beats_make_one_run_per_fire_time(
    env: dict[str, str], api: str, headers: dict[str, str], beats: list[services.Process]
) -> None:
    body = {"name": "every 2 s", "cron": CRON, "job": {"prompt": "tick", "max_tokens": 2}}
    made = httpx.post(f"{api}/v1/schedules", json=body, headers=headers)
    assert made.status_code == 201, made.text
    schedule_id = made.json()["id"]
    time.sleep(WINDOW_SECONDS)
    pause(api, headers, schedule_id)
    assert all(proc.alive() for proc in beats), [p.output() for p in beats]

    fired = sorted(
        datetime.fromisoformat(run["fire_time"]) for run in runs(api, headers, schedule_id)
    )
    # Every slot of the window fired (a beat ticks every second; a slot is 2 s), once each.
    assert len(fired) >= WINDOW_SECONDS // CRON_SECONDS - 2, fired
    assert all(
        b - a == timedelta(seconds=CRON_SECONDS) for a, b in zip(fired, fired[1:], strict=False)
    ), fired
    listed = runs(api, headers, schedule_id)
    assert all(run["status"] == "started" for run in listed), listed
    with session_scope(env["MBATCH_DATABASE_URL"]) as session:
        made_jobs = session.scalars(
            select(Job.id).where(Job.idempotency_key.like(f"sch:{schedule_id}:%"))
        ).all()
    # Exactly one job per fire time: no beat made a second one under another key.
    assert sorted(made_jobs) == sorted(run["job_id"] for run in listed)
    assert len(set(made_jobs)) == len(fired)
    # Each process logs the fires it made: no two beats both made one fire time's run.
    marker = f"schedule {schedule_id} fired for "
    logged = [
        line.split(marker, 1)[1].split(": ", 1)[0]
        for proc in beats
        for line in proc.output().splitlines()
        if marker in line
    ]
    assert len(logged) == len(set(logged)), logged


def test_a_batch_schedule_delivers_one_batch_completed_per_run(
    env: dict[str, str],
    api: str,
    headers: dict[str, str],
    beats: list[services.Process],
    log_dir: Path,
) -> None:
    """Each run of a batch schedule with a callback_url delivers exactly one
    batch.completed, through the outbox and `mbatch webhooks`."""
    line = (
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
        b'{"model": "tiny-random-mistral", "messages": [{"role": "user", "content": "hi"}], '
        b'"max_tokens": 2, "temperature": 0}}\n'
    )
    uploaded = httpx.post(
        f"{api}/v1/files",
        files={"file": ("in.jsonl", line)},
        data={"purpose": "batch"},
        headers=headers,
    )
    assert uploaded.status_code == 200, uploaded.text
    worker = services.start_worker(env, log_dir)
    deliverer = services.Process(services.mbatch("webhooks"), env, log_dir / "webhooks.log")
    try:
        services.wait_for(lambda: "ready." in deliverer.output(), 60, "the webhooks worker")
        with Receiver() as receiver:
            body = {
                "name": "batch every 3 s",
                "cron": "*/3 * * * * *",
                "batch": {"input_file_id": uploaded.json()["id"], "endpoint": CHAT},
                "callback_url": receiver.url,
                "max_cost": 1,
            }
            made = httpx.post(f"{api}/v1/schedules", json=body, headers=headers)
            assert made.status_code == 201, made.text
            schedule_id = made.json()["id"]
            time.sleep(7)
            pause(api, headers, schedule_id)
            listed = runs(api, headers, schedule_id)
            assert all(run["status"] == "started" for run in listed), listed
            batch_ids = {run["batch_id"] for run in listed}
            assert len(batch_ids) == len(listed) >= 2, listed

            def ended() -> bool:
                statuses = [
                    httpx.get(f"{api}/v1/batches/{b}", headers=headers).json()["status"]
                    for b in batch_ids
                ]
                return all(status == "completed" for status in statuses)

            services.wait_for(ended, 120, "the schedule's batches to complete", interval=0.5)

            def delivered() -> dict[str, list[str]]:
                got: dict[str, list[str]] = {}
                for received in receiver.snapshot():
                    event = received.verify(
                        httpx.get(f"{api}/v1/webhooks/secret", headers=headers).json()["secret"]
                    )
                    got.setdefault(event["data"]["id"], []).append(event["type"])
                return got

            services.wait_for(
                lambda: set(delivered()) >= batch_ids, 60, "one event per batch", interval=0.5
            )
            time.sleep(2)  # and no second one
            got = delivered()
            assert {b: got.get(b) for b in batch_ids} == {b: ["batch.completed"] for b in batch_ids}
            for batch_id in batch_ids:
                shown = httpx.get(f"{api}/v1/batches/{batch_id}", headers=headers).json()
                assert shown["callback_url"] == receiver.url and shown["max_cost"] == 1
    finally:
        deliverer.stop()
        worker.stop()
