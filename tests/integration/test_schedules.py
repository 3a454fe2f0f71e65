"""Schedules over HTTP, and firing them with a clock the test holds: one run per fire time,
missed windows run once, paused ones fire nothing, runs that cannot start are failed runs."""

import functools
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from jobs.db import get_engine, session_scope
from jobs.maintenance import purge
from jobs.models import Batch, Job, Schedule, ScheduleRun
from jobs.queue import InProcessQueue
from jobs.schedules import fire_due, run_key
from jobs.schedules.firing import RETRY_AFTER, due_query
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from migrations.runner import upgrade
from tests import services

PROMPT = {"prompt": "Hello there", "max_tokens": 4}
CHAT = "/v1/chat/completions"
LINE = (
    b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}\n'
)
# Public, and numeric: accepted by the address check without a DNS lookup.
HOOK = "https://8.8.8.8/hook"


def upload(client: TestClient, headers: dict[str, str]) -> str:
    made = client.post(
        "/v1/files", files={"file": ("in.jsonl", LINE)}, data={"purpose": "batch"}, headers=headers
    )
    assert made.status_code == 200, made.text
    return made.json()["id"]  # type: ignore[no-any-return]


def create(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    made = client.post("/v1/schedules", json={"name": "nightly", **body}, headers=headers)
    assert made.status_code == 201, made.text
    return made.json()  # type: ignore[no-any-return]


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def runs(client: TestClient, headers: dict[str, str], schedule_id: str) -> list[dict[str, Any]]:
    listed = client.get(f"/v1/schedules/{schedule_id}/runs", headers=headers)
    assert listed.status_code == 200, listed.text
    return listed.json()["data"]  # type: ignore[no-any-return]


@pytest.fixture
def fire(api_settings: Settings) -> Any:
    """fire_due on the test database with a clock the test passes."""
    scope = functools.partial(session_scope, api_settings.database_url)
    storage = storage_from_settings(api_settings)

    def fire_at(now: datetime) -> int:
        return fire_due(scope, storage, InProcessQueue(), api_settings, now=now)

    return fire_at


def test_create_get_list_change_delete(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    made = create(client, alice, cron="0 9 * * *", timezone="Europe/Paris", job=PROMPT)
    assert made["object"] == "schedule" and made["id"].startswith("sch_")
    assert made["job"] == PROMPT and made["batch"] is None
    assert made["paused"] is False and made["last_run_at"] is None
    first = when(made["next_run_at"])
    # 09:00 in Paris is 08:00 or 07:00 UTC, within the next day.
    assert first.astimezone(UTC).hour in (7, 8) and first.minute == 0
    assert timedelta(0) < first - datetime.now(UTC) <= timedelta(days=1)
    sid = made["id"]
    assert client.get(f"/v1/schedules/{sid}", headers=alice).json() == made
    listed = client.get("/v1/schedules", params={"limit": 100}, headers=alice).json()
    assert sid in [s["id"] for s in listed["data"]]
    assert sid not in [s["id"] for s in client.get("/v1/schedules", headers=bob).json()["data"]]

    # Another owner's schedule does not exist for bob.
    for method, path in [
        ("GET", f"/v1/schedules/{sid}"),
        ("PATCH", f"/v1/schedules/{sid}"),
        ("DELETE", f"/v1/schedules/{sid}"),
        ("GET", f"/v1/schedules/{sid}/runs"),
    ]:
        answer = client.request(method, path, headers=bob, json={"paused": True})
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["param"] == "schedule_id"

    paused = client.patch(f"/v1/schedules/{sid}", json={"paused": True}, headers=alice).json()
    assert paused["paused"] is True and paused["next_run_at"] is None
    resumed = client.patch(f"/v1/schedules/{sid}", json={"paused": False}, headers=alice).json()
    assert when(resumed["next_run_at"]) == first
    changed = client.patch(
        f"/v1/schedules/{sid}", json={"cron": "30 6 * * *", "timezone": "Asia/Tokyo"}, headers=alice
    ).json()
    assert changed["cron"] == "30 6 * * *" and changed["timezone"] == "Asia/Tokyo"
    assert when(changed["next_run_at"]).astimezone(UTC).strftime("%H:%M") == "21:30"

    deleted = client.delete(f"/v1/schedules/{sid}", headers=alice)
    assert deleted.status_code == 200 and deleted.json() == {
        "id": sid,
        "object": "schedule",
        "deleted": True,
    }
    assert client.get(f"/v1/schedules/{sid}", headers=alice).status_code == 404


def test_schedules_list_in_pages(client: TestClient, alice: dict[str, str]) -> None:
    made = [create(client, alice, cron="0 3 * * *", job=PROMPT)["id"] for _ in range(3)]
    page = client.get("/v1/schedules", params={"limit": 2}, headers=alice).json()
    assert [s["id"] for s in page["data"]] == made[::-1][:2] and page["has_more"] is True
    rest = client.get(
        "/v1/schedules", params={"limit": 1, "after": page["last_id"]}, headers=alice
    ).json()
    assert [s["id"] for s in rest["data"]] == [made[0]]
    bad = client.get("/v1/schedules", params={"after": "sch_nope"}, headers=alice)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"


BAD_BODIES = [
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "* * * *"}, "cron"),
    ({"cron": "0 0 0 0 0 0 0"}, "cron"),
    ({"cron": "0 0 31 2 *"}, "cron"),
    ({"cron": "* * * * * *"}, "cron"),  # every second: under the 60 s minimum
    ({"cron": "*/30 * * * * *"}, "cron"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"timezone": "utc"}, "timezone"),
    ({"timezone": "America"}, "timezone"),
    ({"timezone": "../../etc/passwd"}, "timezone"),
    ({"job": None}, "job"),
    ({"name": ""}, "name"),
    ({"job": {**PROMPT, "max_tokens": 0}}, "job.max_tokens"),
    ({"job": {**PROMPT, "max_tokens": "5"}}, "job.max_tokens"),
    ({"job": {"max_tokens": 4}}, "job.prompt"),
    ({"job": {**PROMPT, "stream": True}}, "job.stream"),
    ({"job": {**PROMPT, "model": "gpt-4"}}, "job.model"),
    ({"job": {**PROMPT, "max_tokens": 100000}}, "job.max_tokens"),  # over the model's context
    ({"job": {**PROMPT, "lora": "no-such-adapter"}}, "job.lora"),
    ({"job": {**PROMPT, "callback_url": HOOK}}, "job.callback_url"),
    ({"job": {**PROMPT, "idempotency_key": "k"}}, "job.idempotency_key"),
    ({"job": {**PROMPT, "run_at": "2030-01-01T00:00:00Z"}}, "job.run_at"),
    ({"job": {**PROMPT, "unknown": 1}}, "job.unknown"),
    ({"callback_url": "http://127.0.0.1/hook"}, "callback_url"),
    ({"callback_url": "ftp://8.8.8.8/"}, "callback_url"),
    ({"max_cost": 0}, "max_cost"),
    ({"max_cost": "1"}, "max_cost"),
    # The job's prompt and 4 tokens cost more than a billionth of a dollar.
    ({"max_cost": 0.000000001}, "max_cost"),
    ({"paused": "yes"}, "paused"),
    ({"batch": {"input_file_id": "file-x", "endpoint": CHAT}}, "batch"),  # and job: both
]


@pytest.mark.parametrize(("change", "param"), BAD_BODIES)
def test_bad_schedules_are_422_naming_the_field(
    client: TestClient, alice: dict[str, str], change: dict[str, Any], param: str
) -> None:
    body = {"name": "n", "cron": "0 9 * * *", "job": PROMPT, **change}
    answer = client.post("/v1/schedules", json=body, headers=alice)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == param, answer.json()


def test_batch_bodies_are_checked_as_post_batches_checks_them(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    own = upload(client, alice)
    bobs = upload(client, bob)

    def post(batch: dict[str, Any]) -> Any:
        body = {"name": "n", "cron": "0 9 * * *", "batch": batch}
        return client.post("/v1/schedules", json=body, headers=alice)

    # As POST /v1/batches answers a file that is not the caller's: 404, naming it.
    for missing in (bobs, "file-nope"):
        answer = post({"input_file_id": missing, "endpoint": CHAT})
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["param"] == "batch.input_file_id"
    extras: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/embeddings"}, "batch.endpoint"),
        ({"max_cost": 1}, "batch.max_cost"),
        ({"callback_url": HOOK}, "batch.callback_url"),
        ({"dry_run": True}, "batch.dry_run"),
        ({"completion_window": "48h"}, "batch.completion_window"),
    ]
    for extra, param in extras:
        answer = post({"input_file_id": own, "endpoint": CHAT, **extra})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == param
    assert post({"input_file_id": own, "endpoint": CHAT}).status_code == 201


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"cron": "not cron"}, "cron"),
        ({"cron": "* * * * * *"}, "cron"),
        ({"cron": None}, "cron"),
        ({"timezone": "Nowhere"}, "timezone"),
        ({"paused": None}, "paused"),
        ({"name": "renamed"}, "name"),
    ],
)
def test_bad_changes_are_422_and_change_nothing(
    client: TestClient, alice: dict[str, str], change: dict[str, Any], param: str
) -> None:
    made = create(client, alice, cron="0 9 * * *", job=PROMPT)
    answer = client.patch(f"/v1/schedules/{made['id']}", json=change, headers=alice)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == param
    assert client.get(f"/v1/schedules/{made['id']}", headers=alice).json() == made


def test_a_job_run_inherits_callback_url_under_the_runs_key(
    client: TestClient, alice: dict[str, str], fire: Any, session: Session
) -> None:
    made = create(client, alice, cron="15 4 * * *", job=PROMPT, callback_url=HOOK, max_cost=1)
    due = when(made["next_run_at"])
    fire(due - timedelta(seconds=1))
    assert runs(client, alice, made["id"]) == []
    fire(due + timedelta(seconds=2))
    [run] = runs(client, alice, made["id"])
    assert run["status"] == "started" and when(run["fire_time"]) == due
    assert run["batch_id"] is None and run["error"] is None
    job = session.get(Job, run["job_id"])
    assert job is not None and job.owner == "alice"
    assert job.callback_url == HOOK
    assert job.idempotency_key == run_key(made["id"], due)
    assert job.input == {"prompt": "Hello there", "raw": False}
    shown = client.get(f"/v1/schedules/{made['id']}", headers=alice).json()
    assert when(shown["last_run_at"]) == due
    assert when(shown["next_run_at"]) == due + timedelta(days=1)


def test_each_fire_time_makes_one_run_however_often_it_is_fired(
    client: TestClient, alice: dict[str, str], fire: Any, session: Session
) -> None:
    made = create(client, alice, cron="20 4 * * *", job=PROMPT)
    due = when(made["next_run_at"])
    # Many passes at once, as many beats and workers would run them.
    threads = [threading.Thread(target=fire, args=(due,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fire(due)  # and once more, after they all committed
    [run] = runs(client, alice, made["id"])
    key = run_key(made["id"], due)
    jobs = session.scalars(select(Job).where(Job.idempotency_key == key)).all()
    assert [job.id for job in jobs] == [run["job_id"]]


def test_missed_windows_run_once_for_the_latest(
    client: TestClient, alice: dict[str, str], fire: Any
) -> None:
    made = create(client, alice, cron="*/5 * * * *", job=PROMPT)
    due = when(made["next_run_at"])
    # Nothing ran for 3 hours and 7 minutes: 37 slots were missed, one runs.
    now = due + timedelta(hours=3, minutes=7)
    fire(now)
    [run] = runs(client, alice, made["id"])
    assert when(run["fire_time"]) == due + timedelta(hours=3, minutes=5)
    shown = client.get(f"/v1/schedules/{made['id']}", headers=alice).json()
    assert when(shown["next_run_at"]) == due + timedelta(hours=3, minutes=10)
    # The next slot, then, and the runs come newest first, in pages.
    fire(due + timedelta(hours=3, minutes=10))
    fire(due + timedelta(hours=3, minutes=15))
    listed = runs(client, alice, made["id"])
    assert [when(r["fire_time"]) - due for r in listed] == [
        timedelta(hours=3, minutes=15),
        timedelta(hours=3, minutes=10),
        timedelta(hours=3, minutes=5),
    ]
    page = client.get(
        f"/v1/schedules/{made['id']}/runs",
        params={"limit": 1, "after": listed[0]["fire_time"]},
        headers=alice,
    ).json()
    assert [r["fire_time"] for r in page["data"]] == [listed[1]["fire_time"]]
    assert page["has_more"] is True


def test_a_paused_schedule_fires_nothing(
    client: TestClient, alice: dict[str, str], fire: Any
) -> None:
    made = create(client, alice, cron="*/5 * * * *", job=PROMPT, paused=True)
    assert made["next_run_at"] is None
    fire(datetime.now(UTC) + timedelta(days=2))
    assert runs(client, alice, made["id"]) == []
    resumed = client.patch(f"/v1/schedules/{made['id']}", json={"paused": False}, headers=alice)
    fire(when(resumed.json()["next_run_at"]))
    assert len(runs(client, alice, made["id"])) == 1


def test_a_batch_run_gets_max_cost_and_callback_url_and_is_validated(
    client: TestClient, alice: dict[str, str], fire: Any
) -> None:
    file_id = upload(client, alice)
    batch = {"input_file_id": file_id, "endpoint": CHAT, "metadata": {"team": "data"}}
    made = create(client, alice, cron="0 5 * * *", batch=batch, max_cost=0.5, callback_url=HOOK)
    assert made["batch"] == batch and made["job"] is None
    due = when(made["next_run_at"])
    fire(due)
    fire(due)
    [run] = runs(client, alice, made["id"])
    assert run["status"] == "started" and run["job_id"] is None

    # Its lines are checked and queued as it fires (beside the firing loop), not after
    # maintenance's grace period.
    def shown_batch() -> dict[str, Any]:
        return client.get(f"/v1/batches/{run['batch_id']}", headers=alice).json()  # type: ignore[no-any-return]

    services.wait_for(lambda: shown_batch()["status"] != "validating", 10, "validation")
    shown = shown_batch()
    assert shown["max_cost"] == 0.5 and shown["callback_url"] == HOOK
    assert shown["input_file_id"] == file_id and shown["metadata"] == {"team": "data"}
    assert shown["status"] == "in_progress" and shown["request_counts"]["total"] == 1
    # The next day's run is a batch of its own.
    fire(due + timedelta(days=1))
    later, first = runs(client, alice, made["id"])
    assert first == run and later["batch_id"] != run["batch_id"]


def test_a_run_whose_file_was_deleted_is_a_failed_run_with_the_reason(
    client: TestClient, alice: dict[str, str], fire: Any, session: Session
) -> None:
    file_id = upload(client, alice)
    made = create(
        client, alice, cron="0 6 * * *", batch={"input_file_id": file_id, "endpoint": CHAT}
    )
    assert client.delete(f"/v1/files/{file_id}", headers=alice).status_code == 200
    due = when(made["next_run_at"])
    fire(due)
    [run] = runs(client, alice, made["id"])
    assert run["status"] == "failed" and run["batch_id"] is None
    assert run["error"] == f"not_found: no file {file_id}"
    assert session.scalars(select(Batch).where(Batch.input_file_id == file_id)).all() == []
    # The schedule goes on: its next fire is due, and fails the same way.
    shown = client.get(f"/v1/schedules/{made['id']}", headers=alice).json()
    assert when(shown["last_run_at"]) == due
    assert when(shown["next_run_at"]) == due + timedelta(days=1)


def test_a_job_run_over_max_cost_is_a_failed_run(
    client: TestClient, alice: dict[str, str], fire: Any, session: Session
) -> None:
    made = create(client, alice, cron="0 7 * * *", job=PROMPT, max_cost=1)
    # The price, or the limit, changed since the schedule was made.
    session.execute(
        update(Schedule).where(Schedule.id == made["id"]).values(max_cost=Decimal("1e-9"))
    )
    session.commit()
    fire(when(made["next_run_at"]))
    [run] = runs(client, alice, made["id"])
    assert run["status"] == "failed" and run["job_id"] is None
    assert run["error"].startswith("invalid_parameter: max_cost=")
    assert "may cost up to" in run["error"]


def test_finding_due_schedules_reads_only_the_active_index() -> None:
    """Every beat and worker asks this every second: with many paused schedules and many due
    later, Postgres reads the partial index of active ones, never the table."""
    name = services.create_database()
    url = services.database_url(name)
    try:
        upgrade(url, quiet=True)
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(
                """
                INSERT INTO schedules (id, owner, name, cron, timezone, kind, body, paused,
                                       next_run_at, created_at)
                SELECT 'sch_' || g, 'o' || mod(g, 50), 'n', '0 * * * *', 'UTC', 'job', '{}',
                       mod(g, 2) = 0,
                       CASE WHEN mod(g, 2) = 0 THEN NULL
                            ELSE now() + g * interval '1 minute' END,
                       now()
                FROM generate_series(1, 20000) AS g
                """
            )
            conn.execute("ANALYZE schedules")
            query = due_query(datetime.now(UTC)).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
            plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {query}"))
        assert "ix_schedules_next_run" in plan, plan
        assert "Seq Scan" not in plan, plan
    finally:
        get_engine(url).dispose()
        services.drop_database(name)


def test_retention_deletes_runs_past_the_limit_and_keeps_the_rest(
    client: TestClient, alice: dict[str, str], api_settings: Settings, fire: Any, session: Session
) -> None:
    made = create(client, alice, cron="*/5 * * * *", job=PROMPT)
    due = when(made["next_run_at"])
    fire(due)
    fire(due + timedelta(minutes=5))
    old, recent = sorted(runs(client, alice, made["id"]), key=lambda run: run["fire_time"])
    session.execute(
        update(ScheduleRun)
        .where(
            ScheduleRun.schedule_id == made["id"],
            ScheduleRun.fire_time == when(old["fire_time"]),
        )
        .values(created_at=ScheduleRun.created_at - timedelta(days=api_settings.retention_days + 1))
    )
    session.commit()
    scope = functools.partial(session_scope, api_settings.database_url)
    deleted = purge(scope, storage_from_settings(api_settings), api_settings)
    assert deleted["schedule_runs"] == 1
    assert runs(client, alice, made["id"]) == [recent]


def test_a_schedule_whose_fire_fails_unexpectedly_waits_and_holds_up_no_other(
    client: TestClient, alice: dict[str, str], fire: Any, session: Session
) -> None:
    broken = create(client, alice, cron="10 6 * * *", job=PROMPT)
    healthy = create(client, alice, cron="10 6 * * *", job=PROMPT)
    # A zone that went missing from the host's zone data since the schedule was made.
    session.execute(
        update(Schedule).where(Schedule.id == broken["id"]).values(timezone="Gone/Zone")
    )
    session.commit()
    due = when(broken["next_run_at"])
    fire(due)
    assert runs(client, alice, broken["id"]) == []
    assert len(runs(client, alice, healthy["id"])) == 1
    # Not tried again at every pass: after a pause, behind the schedules that are due.
    shown = client.get(f"/v1/schedules/{broken['id']}", headers=alice).json()
    assert when(shown["next_run_at"]) == due + RETRY_AFTER
    assert fire(due + timedelta(seconds=1)) == 0
