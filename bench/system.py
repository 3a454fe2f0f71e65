"""The whole system against the engine alone, on the CPU: the same 256 jobs sent one by one
through the HTTP API, Redis, a worker process and Postgres, timed from the first request to
the last result, against the same jobs run in-process through the same batching and engine.

Needs Postgres and Redis on 127.0.0.1 (it makes a database and uses a Redis database of its
own).

    python bench/system.py [--jobs 256]
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import (  # noqa: E402
    JOBS,
    BenchJob,
    bench_model,
    make_workload,
    report,
    run_engine,
    timed_run,
)
from jobs.db import get_engine, session_scope  # noqa: E402
from jobs.models import Job, JobStatus  # noqa: E402
from jobs.registry import resolve_model  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.tokenizer import v1_tokenizer  # noqa: E402
from migrations.runner import upgrade  # noqa: E402
from tests import services  # noqa: E402
from worker.engine.loader import load_model  # noqa: E402

WORDS = [
    *"river stone light garden window quiet morning silver paper music orange winter".split(),
    *"market forest letter candle harbor meadow thunder pocket mirror lantern castle".split(),
]
FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def text_of_length(tokens: int, rng: random.Random) -> str:
    """Raw prompt text of about `tokens` tokens."""
    tokenizer = v1_tokenizer()
    words: list[str] = []
    while len(tokenizer.encode_prompt(" ".join(words), raw=True)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(max(1, (tokens - len(words)) // 2)))
    return " ".join(words)


def bodies(jobs: list[BenchJob]) -> list[dict[str, Any]]:
    rng = random.Random(1)
    out = []
    for job in jobs:
        body: dict[str, Any] = {
            "prompt": text_of_length(len(job.prompt), rng),
            "raw": True,
            "max_tokens": job.params.max_tokens,
            "temperature": job.params.temperature,
            "top_p": job.params.top_p,
        }
        if job.params.seed is not None:
            body["seed"] = job.params.seed
        out.append(body)
    return out


def run_system(
    requests: list[dict[str, Any]], env: dict[str, str], logs: Path, key: str
) -> tuple[int, float]:
    api, url = services.start_api(env, logs)
    worker = services.start_worker(env, logs)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        started = time.perf_counter()
        with (
            httpx.Client(base_url=url, headers=headers, timeout=60) as client,
            ThreadPoolExecutor(4) as pool,
        ):
            responses = list(pool.map(lambda body: client.post("/v1/jobs", json=body), requests))
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses][:3]
        print(f"submitted {len(requests)} jobs in {time.perf_counter() - started:.1f} s")
        database = env["MBATCH_DATABASE_URL"]
        while True:
            with session_scope(database) as session:
                done = session.scalar(select(func.count()).where(Job.status.in_(FINISHED)))
            if done == len(requests):
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        with session_scope(database) as session:
            tokens = session.scalar(select(func.sum(Job.completion_tokens))) or 0
            failed = session.scalar(select(func.count()).where(Job.status != JobStatus.succeeded))
            batches = session.execute(
                select(func.count(Job.id), func.min(Job.started_at), func.max(Job.finished_at))
                .group_by(Job.group_id)
                .order_by(func.min(Job.started_at))
            ).all()
            print("batch sizes, in order:", " ".join(str(size) for size, _, _ in batches))
            busy = sum((end - start).total_seconds() for _, start, end in batches)
            print(f"worker busy in batches for {busy:.1f} s")
        assert failed == 0, f"{failed} jobs did not succeed"
        return int(tokens), seconds
    finally:
        worker.stop()
        api.stop()
        for line in worker.output().splitlines():
            if "tokens decoded" in line:
                print("worker:", line.split(": ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        weights = bench_model(root)
        requests = bodies(make_workload(args.jobs))

        database = services.database_url(services.create_database())
        upgrade(database, quiet=True)
        env = {
            **os.environ,
            "MBATCH_DATABASE_URL": database,
            "MBATCH_BROKER_URL": services.redis_url(),
            "MBATCH_STORAGE_URL": f"file://{root / 'storage'}",
            "MBATCH_MODELS_DIR": str(root),
            "MBATCH_MODEL": "tiny-random-mistral",
            "MBATCH_MAX_BATCH_SIZE": "32",
        }
        # The worker loads the benchmark model in place of the tiny one.
        (root / "tiny-random-mistral").symlink_to(weights)
        key = services_key(env)
        try:
            system_tokens, system_seconds = run_system(requests, env, root, key)
        finally:
            get_engine(database).dispose()
            services.drop_database(database.rsplit("/", 1)[1])
        system_rate = report("system", system_tokens, system_seconds)

        settings = Settings(max_batch_size=32, models_dir=root)
        loaded = load_model(resolve_model("tiny-random-mistral"), settings, weights)
        tokenizer = loaded.tokenizer
        jobs = [
            BenchJob(tokenizer.encode_prompt(body["prompt"], raw=True), job.params)
            for body, job in zip(requests, make_workload(args.jobs), strict=True)
        ]
        torch.manual_seed(0)
        engine_rate = timed_run("engine", lambda: run_engine(loaded, jobs, settings))
    ratio = system_rate / engine_rate
    print(f"system / engine: {ratio:.2f}")
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "system_tokens_per_s": round(system_rate, 1),
                "engine_tokens_per_s": round(engine_rate, 1),
                "ratio": round(ratio, 2),
            }
        )
    )


def services_key(env: dict[str, str]) -> str:
    from tests.conftest import create_key

    return create_key(env, "bench")


if __name__ == "__main__":
    main()
