"""Interactive requests beside a large file batch, on one worker (the tiny model, on the CPU).

One owner's 2,000-line file batch runs while a second owner sends streamed chat requests
(`POST /v1/chat/completions`, `stream: true`) one after another, for as long as it runs. The
time to the first token and to the whole answer (p50, p99) are compared with the same requests
on an idle worker, and the batch's tokens/s with the same batch running alone. `step_s` is one
decode step of the loaded batch (its rows over its tokens/s alone).

Everything runs as deployed: `mbatch api` and `mbatch worker` processes, Postgres and Redis on
127.0.0.1 (a database and a Redis database made for the run), storage in a folder. The worker
decodes on one thread (`OMP_NUM_THREADS=1`), leaving the machine's other cores to the rest.

    python bench/interactive.py [--lines 2000] [--requests 30]

`--requests` is the number of requests on the idle worker; under the batch, they go on until
it ends.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select  # noqa: E402

from jobs.db import get_engine, session_scope  # noqa: E402
from jobs.models import Job  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from migrations.runner import upgrade  # noqa: E402
from tests import services  # noqa: E402
from tests.conftest import create_key  # noqa: E402

WORDS = "river stone light garden window quiet morning silver paper music orange winter".split()
# The batch's lines and the interactive requests decode this many tokens each.
BATCH_MAX_TOKENS = 32
CHAT_MAX_TOKENS = 16
MAX_BATCH_SIZE = 32
WORKER_THREADS = 1


def batch_file(lines: int) -> bytes:
    out = io.StringIO()
    for index in range(lines):
        words = " ".join(WORDS[(index + k) % len(WORDS)] for k in range(8 + index % 24))
        body = {
            "model": "tiny-random-mistral",
            "messages": [{"role": "user", "content": f"Line {index}: {words}"}],
            "max_tokens": BATCH_MAX_TOKENS,
            "temperature": 0.7,
            "seed": index + 1,
        }
        line = {"custom_id": f"line-{index}", "method": "POST", "url": "/v1/chat/completions"}
        out.write(json.dumps({**line, "body": body}) + "\n")
    return out.getvalue().encode()


def run_batch(client: httpx.Client, content: bytes) -> str:
    uploaded = client.post(
        "/v1/files",
        files={"file": ("lines.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
    )
    uploaded.raise_for_status()
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    batch.raise_for_status()
    return str(batch.json()["id"])


def wait_batch(client: httpx.Client, batch_id: str, lines: int) -> dict[str, Any]:
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch  # type: ignore[no-any-return]
        time.sleep(0.5)


def batch_rate(database: str, batch_id: str) -> tuple[float, int, float]:
    """The batch's completion tokens over the time from its first line started to its last
    ended: (tokens/s, tokens, seconds)."""
    with session_scope(database) as session:
        tokens, started, ended = session.execute(
            select(
                func.sum(Job.completion_tokens), func.min(Job.started_at), func.max(Job.finished_at)
            ).where(Job.batch_id == batch_id)
        ).one()
    seconds = (ended - started).total_seconds()
    return tokens / seconds, int(tokens), seconds


def chat(client: httpx.Client, index: int) -> tuple[float, float, str]:
    """One streamed chat request: seconds to its first token and to its whole answer, and
    its job's id."""
    body = {
        "model": "tiny-random-mistral",
        "messages": [{"role": "user", "content": f"Question {index}: name a colour."}],
        "max_tokens": CHAT_MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        job_id = response.headers["x-mbatch-job-id"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            content = "".join(
                choice.get("delta", {}).get("content") or "" for choice in chunk.get("choices", [])
            )
            if content and first is None:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (first if first is not None else total), total, job_id


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def chats(
    client: httpx.Client,
    label: str,
    database: str,
    count: int | None = None,
    until: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Chat requests one after another: `count` of them, or as many as run before `until`."""
    ttft, full, ids = [], [], []
    while (count is None or len(ids) < count) and not (until is not None and until()):
        first, total, job_id = chat(client, len(ids))
        ttft.append(first)
        full.append(total)
        ids.append(job_id)
    # Where the time to the first token goes: from the job's row to its message going out
    # (the API), and from there to the worker's claim.
    with session_scope(database) as session:
        rows = session.execute(
            select(Job.created_at, Job.enqueued_at, Job.started_at).where(Job.id.in_(ids))
        ).all()
    waits = [(started - created).total_seconds() for created, _, started in rows]
    sent = [(enqueued - created).total_seconds() for created, enqueued, _ in rows if enqueued]
    figures = {
        "requests": len(ids),
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": percentile(ttft, 0.99),
        "total_p50": statistics.median(full),
        "total_p99": percentile(full, 0.99),
        "claim_p50": statistics.median(waits),
        "claim_p99": percentile(waits, 0.99),
        "sent_p99": percentile(sent, 0.99) if sent else 0.0,
    }
    print(
        f"{label}: {len(ids)} requests, first token p50 {figures['ttft_p50']:.3f} s "
        f"p99 {figures['ttft_p99']:.3f} s; whole answer p50 {figures['total_p50']:.3f} s "
        f"p99 {figures['total_p99']:.3f} s; from the job's row to its claim p50 "
        f"{figures['claim_p50']:.3f} s p99 {figures['claim_p99']:.3f} s (of which to its "
        f"message p99 {figures['sent_p99']:.3f} s)"
    )
    return figures


def batch_done(database: str, batch_id: str) -> Callable[[], bool]:
    """Whether the batch's lines have all ended, looked at every tenth call (a cheap query)."""
    calls = 0

    def done() -> bool:
        nonlocal calls
        calls += 1
        if calls % 10:
            return False
        with session_scope(database) as session:
            left = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.batch_id == batch_id, Job.status.in_(["queued", "running"]))
            )
        return not left

    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        database = services.database_url(services.create_database())
        upgrade(database, quiet=True)
        env = {
            **os.environ,
            "MBATCH_DATABASE_URL": database,
            "MBATCH_BROKER_URL": services.redis_url(),
            "MBATCH_STORAGE_URL": f"file://{root / 'storage'}",
            "MBATCH_MODELS_DIR": str(root / "models"),
            "MBATCH_MODEL": "tiny-random-mistral",
            "MBATCH_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
        }
        bulk_key, chat_key = create_key(env, "bulk"), create_key(env, "chat")
        api, url = services.start_api(env, root)
        # The worker decodes on one core and leaves the other to the API, Postgres, Redis
        # and this client, as a GPU worker leaves its host's cores to them: on two cores, a
        # decode spread over both stalls whenever anything else runs.
        worker = services.start_worker({**env, "OMP_NUM_THREADS": str(WORKER_THREADS)}, root)
        try:
            with (
                httpx.Client(base_url=url, headers=_auth(bulk_key), timeout=120) as bulk,
                httpx.Client(base_url=url, headers=_auth(chat_key), timeout=120) as asker,
            ):
                chat(asker, -1)  # warm-up: the first request pays for imports and caches
                idle = chats(asker, "idle worker", database, count=args.requests)
                content = batch_file(args.lines)
                alone_id = run_batch(bulk, content)
                wait_batch(bulk, alone_id, args.lines)
                alone_rate, tokens, seconds = batch_rate(database, alone_id)
                print(f"batch alone: {tokens} tokens in {seconds:.1f} s, {alone_rate:.0f} tokens/s")
                loaded_id = run_batch(bulk, content)
                while bulk.get(f"/v1/batches/{loaded_id}").json()["status"] != "in_progress":
                    time.sleep(0.2)
                time.sleep(2.0)  # the batch's slots are full by now
                # Requests one after another for as long as the batch runs.
                load = chats(
                    asker, "under the batch", database, until=batch_done(database, loaded_id)
                )
                wait_batch(bulk, loaded_id, args.lines)
                loaded_rate, tokens, seconds = batch_rate(database, loaded_id)
                print(f"batch under load: {tokens} tokens in {seconds:.1f} s, {loaded_rate:.0f}/s")
        finally:
            worker.stop()
            api.stop()
            get_engine(database).dispose()
            services.drop_database(database.rsplit("/", 1)[1])
    # A step decodes one token per bulk row: the slots less those kept for interactive work.
    bulk_rows = MAX_BATCH_SIZE - getattr(Settings(), "interactive_slots", 0)
    step_s = bulk_rows / alone_rate
    ratio = loaded_rate / alone_rate
    bound = 3 * idle["ttft_p99"] + step_s
    print(f"one decode step of the loaded batch: about {step_s * 1000:.1f} ms")
    print(f"p99 first token under load {load['ttft_p99']:.3f} s; bound 3 x idle + step {bound:.3f}")
    print(f"batch tokens/s under load / alone: {ratio:.2f}")
    print(
        json.dumps(
            {
                "lines": args.lines,
                "requests_idle": idle["requests"],
                "requests_load": load["requests"],
                "ttft_p50_idle_s": round(idle["ttft_p50"], 4),
                "ttft_p99_idle_s": round(idle["ttft_p99"], 4),
                "ttft_p50_load_s": round(load["ttft_p50"], 4),
                "ttft_p99_load_s": round(load["ttft_p99"], 4),
                "total_p50_idle_s": round(idle["total_p50"], 4),
                "total_p99_idle_s": round(idle["total_p99"], 4),
                "total_p50_load_s": round(load["total_p50"], 4),
                "total_p99_load_s": round(load["total_p99"], 4),
                "step_s": round(step_s, 4),
                "batch_tokens_per_s_alone": round(alone_rate, 1),
                "batch_tokens_per_s_load": round(loaded_rate, 1),
                "batch_throughput_ratio": round(ratio, 3),
            }
        )
    )


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


if __name__ == "__main__":
    main()
