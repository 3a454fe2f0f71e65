"""`mbatch run`: the whole pipeline in one process on the embedded default.

SQLite stands in for Postgres and a local folder for S3; jobs are recorded, claimed, decoded
and recorded again by the same code the API and the workers use.
"""

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from jobs import files, service
from jobs.db import session_scope
from jobs.errors import InvalidParameter, MbatchError, describe, main_error
from jobs.models import Job, JobStatus
from jobs.queries import Claim
from jobs.queue import InProcessQueue
from jobs.registry import resolve_model
from jobs.schemas.jobs import job_public
from jobs.schemas.native import JobCreate
from jobs.schemas.openai import BatchLine
from jobs.settings import Settings
from jobs.storage import storage_from_settings
from migrations.runner import upgrade

LOCAL_OWNER = "local"


@dataclass
class LineResult:
    line: int
    custom_id: str | None = None
    job_id: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Summary:
    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    decode_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def embedded_settings(state_dir: Path, model: str) -> Settings:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return Settings(
        database_url=f"sqlite:///{state_dir / 'mbatch.db'}",
        storage_url=f"file://{state_dir / 'storage'}",
        model=model,
    )


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, MbatchError):
        return {"code": exc.code, "message": exc.message, "param": exc.param}
    if isinstance(exc, ValidationError):
        param, message = describe(main_error(exc.errors()))
        return {"code": "invalid_parameter", "message": message, "param": param}
    return {"code": "invalid_line", "message": str(exc), "param": None}


def submit_lines(path: Path, settings: Settings, queue: InProcessQueue) -> list[LineResult]:
    """Record a job for each good line; a bad line, whatever it holds, gets an error naming
    its line number, and the others run."""
    results = []
    seen: set[str] = set()
    with path.open("rb") as stream, session_scope(settings.database_url) as session:
        for number, raw in enumerate(files.read_lines(stream, settings.max_request_bytes), 1):
            if raw is not None and not raw.strip():
                continue
            result = LineResult(line=number)
            try:
                prepared = _prepare_line(raw, settings, seen, result)
                job, _ = service.submit_job(session, queue, LOCAL_OWNER, prepared)
                result.job_id = job.id
            except Exception as exc:  # a line we cannot take fails alone
                result.error = _error(exc)
            results.append(result)
    return results


def _prepare_line(
    raw: bytes | None, settings: Settings, seen: set[str], result: LineResult
) -> service.PreparedJob:
    """A line as a native job body or an OpenAI batch line, on the run's model."""
    if raw is None:
        raise InvalidParameter("line", "...", "longer than the largest request accepted")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidParameter("line", "...", "not JSON we read (nested too deeply)") from None
    if isinstance(data, dict) and "custom_id" in data:
        batch_line = BatchLine.model_validate(data)
        if batch_line.custom_id in seen:
            raise InvalidParameter("custom_id", batch_line.custom_id, "used twice")
        seen.add(batch_line.custom_id)
        result.custom_id = batch_line.custom_id
        body = batch_line.parsed_body().model_copy(update={"model": settings.model})
        return service.prepare_openai(body, settings)
    if not isinstance(data, dict):
        raise InvalidParameter("line", type(data).__name__, "a line is a JSON object")
    native = JobCreate.model_validate({**data, "model": settings.model})
    return service.prepare_native(native, settings)


def run_file(path: Path, output: Path | None, model: str, state_dir: Path) -> int:
    from worker.engine.loader import load_model
    from worker.runtime import WorkerRuntime

    settings = embedded_settings(state_dir, resolve_model(model).name)
    upgrade(settings.database_url, quiet=True)
    storage = storage_from_settings(settings)
    queue = InProcessQueue()
    results = submit_lines(path, settings, queue)
    pending = [r for r in results if r.job_id is not None]

    loaded = load_model(resolve_model(settings.model), settings)

    def scope():  # type: ignore[no-untyped-def]
        return session_scope(settings.database_url)

    runtime = WorkerRuntime(
        settings, loaded, scope, storage, queue, f"run-{os.getpid()}@{socket.gethostname()}"
    )
    started = time.perf_counter()
    with tqdm(total=len(pending), unit="job", desc="generating", file=sys.stderr) as bar:

        def on_batch(claims: list[Claim]) -> None:
            bar.update(len(claims))

        runtime.drain(on_batch)
    summary = Summary(decode_seconds=time.perf_counter() - started)

    out = output.open("w", encoding="utf-8") if output else sys.stdout
    try:
        with session_scope(settings.database_url) as session:
            for result in results:
                row = _output_row(
                    result, session.get(Job, result.job_id) if result.job_id else None, storage
                )
                _count(summary, row)
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()
    _print_summary(summary, output)
    return 0 if summary.failed == 0 else 1


def _output_row(result: LineResult, job: Job | None, storage: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"line": result.line}
    if result.custom_id is not None:
        row["custom_id"] = result.custom_id
    if job is None:
        row.update(
            id=None, status="failed", response=None, usage=None, cost=None, error=result.error
        )
        return row
    public = job_public(job, storage)
    row.update(
        id=public.id,
        status=public.status.value,
        response=public.result.response if public.result else None,
        usage=public.usage.model_dump() if public.usage else None,
        cost=public.cost.model_dump() if public.cost else None,
        finish_reason=public.finish_reason,
        error=public.error.model_dump() if public.error else None,
    )
    return row


def _count(summary: Summary, row: dict[str, Any]) -> None:
    summary.jobs += 1
    if row["status"] == JobStatus.succeeded.value:
        summary.succeeded += 1
        summary.prompt_tokens += row["usage"]["prompt_tokens"]
        summary.completion_tokens += row["usage"]["completion_tokens"]
        summary.cost += row["cost"]["total"]
    else:
        summary.failed += 1


def _print_summary(summary: Summary, output: Path | None) -> None:
    rate = summary.completion_tokens / summary.decode_seconds if summary.decode_seconds else 0.0
    lines = [
        f"jobs: {summary.jobs} ({summary.succeeded} succeeded, {summary.failed} failed)",
        f"tokens: {summary.prompt_tokens} prompt + {summary.completion_tokens} completion",
        f"throughput: {rate:.1f} completion tokens/s over {summary.decode_seconds:.2f} s",
        f"cost: ${summary.cost:.8f}",
    ]
    if output:
        lines.append(f"output: {output}")
    print("\n".join(lines), file=sys.stderr)
