"""Uploading and validating a large batch input file: lines/s, and the API's peak memory.

A 50,000-line chat file (OpenAI batch format, prompts of 20 to 200 words) is uploaded to
`mbatch api` with `POST /v1/files`, a batch is created, and the clock stops when validation
has enqueued every line (`in_progress`). The API process's peak resident memory (VmHWM) is
read from /proc and compared with its size when idle after start-up. No worker runs: the jobs
stay queued, in a database made for the run and dropped after. With `--queued N`, N other jobs
wait in the queue first (submitted through the real path and copied by SQL, as
`bench/queue_scale.py` fills its queue), to show that validation does not slow down with it.

Needs Postgres and Redis on 127.0.0.1.

    python bench/batch_upload.py [--lines 50000] [--queued 300000]
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.queue_scale import (  # noqa: E402
    SPREAD_START,
    TEMPLATES,
    copy_jobs,
    make_settings,
    submit_templates,
    vacuum_analyze,
)
from jobs.db import get_engine, session_scope  # noqa: E402
from jobs.keys import create_key  # noqa: E402
from jobs.timeutil import utcnow  # noqa: E402
from migrations.runner import upgrade  # noqa: E402
from tests import services  # noqa: E402

WORDS = "river stone light garden window quiet morning silver paper music orange winter".split()


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def write_file(path: Path, lines: int) -> None:
    rng = random.Random(0)
    with path.open("w") as out:
        for n in range(lines):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
            body = {
                "model": "tiny-random-mistral",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 64,
                "seed": n + 1,
            }
            line = {"custom_id": f"row-{n}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**line, "body": body}) + "\n")


def fill_queue(url: str, storage_dir: Path, count: int) -> None:
    """`count` queued jobs of the model, published hours ago, in the run's database."""
    templates = submit_templates(
        lambda: session_scope(url), make_settings(url, storage_dir), TEMPLATES
    )
    engine = get_engine(url)
    copy_jobs(
        engine, templates, len(templates), max(count, len(templates)), utcnow() - SPREAD_START
    )
    vacuum_analyze(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--queued", type=int, default=0, help="other jobs queued beforehand")
    args = parser.parse_args()

    name = services.create_database()
    url = services.database_url(name)
    upgrade(url, quiet=True)
    with session_scope(url) as session:
        key = create_key(session, "bench")
    headers = {"Authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.queued:
            fill_queue(url, root / "storage", args.queued)
        env = {
            **os.environ,
            "MBATCH_DATABASE_URL": url,
            "MBATCH_BROKER_URL": services.redis_url(),
            "MBATCH_STORAGE_URL": f"file://{root / 'storage'}",
            "MBATCH_MODEL": "tiny-random-mistral",
        }
        api, api_url = services.start_api(env, root)
        try:
            data = root / "input.jsonl"
            write_file(data, args.lines)
            size_mb = data.stat().st_size / 1e6
            # Idle: after start-up and one small batch, so lazy imports are counted as idle.
            small = httpx.post(
                f"{api_url}/v1/files",
                files={"file": ("warm.jsonl", data.open("rb").readline())},
                data={"purpose": "batch"},
                headers=headers,
            ).json()
            httpx.post(
                f"{api_url}/v1/batches",
                json={"input_file_id": small["id"], "endpoint": "/v1/chat/completions"},
                headers=headers,
            )
            time.sleep(2)
            pid = api.proc.pid
            idle = memory_kib(pid, "VmRSS")

            started = time.perf_counter()
            with data.open("rb") as stream:
                uploaded = httpx.post(
                    f"{api_url}/v1/files",
                    files={"file": ("input.jsonl", stream)},
                    data={"purpose": "batch"},
                    headers=headers,
                    timeout=600,
                ).json()
            uploaded_at = time.perf_counter()
            batch = httpx.post(
                f"{api_url}/v1/batches",
                json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions"},
                headers=headers,
            ).json()

            def validated() -> bool:
                found = httpx.get(f"{api_url}/v1/batches/{batch['id']}", headers=headers).json()
                return bool(found["status"] != "validating")

            services.wait_for(validated, 1800, "validation", interval=0.5)
            finished = time.perf_counter()
            peak = memory_kib(pid, "VmHWM")
        finally:
            api.stop()
    get_engine(url).dispose()
    services.drop_database(name)

    seconds = finished - started
    extra_mb = (peak - idle) / 1024
    print(f"file: {args.lines} lines, {size_mb:.1f} MB; {args.queued} other jobs queued")
    print(f"upload: {uploaded_at - started:.1f} s; upload + validation: {seconds:.1f} s")
    print(f"= {args.lines / seconds:.0f} lines/s")
    print(f"API memory: idle {idle / 1024:.0f} MB, peak {peak / 1024:.0f} MB: +{extra_mb:.0f} MB")
    print(
        json.dumps(
            {
                "lines": args.lines,
                "other_queued": args.queued,
                "file_mb": round(size_mb, 1),
                "upload_seconds": round(uploaded_at - started, 2),
                "total_seconds": round(seconds, 2),
                "lines_per_s": round(args.lines / seconds, 1),
                "api_idle_mb": round(idle / 1024, 1),
                "api_peak_mb": round(peak / 1024, 1),
                "api_extra_mb": round(extra_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
