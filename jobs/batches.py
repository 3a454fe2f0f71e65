"""Batches (the OpenAI Batch API): an input file's lines validated into jobs, run in the
shared static batches next to everyone's work, and gathered into output and error files.

Each step that takes a while (validating, finalizing) is taken under a lease on the batch
row, so a process that dies mid-step leaves it to maintenance, and every step can run again
without doing anything twice: a line's job id is fixed by its batch and line number.
"""

import hashlib
import heapq
import json
import logging
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs import files
from jobs.batch_lines import error_line, output_line
from jobs.db import add_once
from jobs.errors import Conflict, InvalidParameter, MbatchError, NotFound, describe, main_error
from jobs.loras import adapter_for_job
from jobs.models import Batch, BatchStatus, FileObject, Job, JobStatus, LineError
from jobs.outages import unavailable
from jobs.pricing import price
from jobs.queue import JobQueue
from jobs.registry import ModelSpec, resolve_model
from jobs.schemas.base import storable_text
from jobs.schemas.batches import BatchCreate, BatchEstimate, RequestCounts
from jobs.schemas.jobs import RESULT_UNAVAILABLE, response_text
from jobs.schemas.openai import BatchLine
from jobs.service import PreparedJob, prepare_openai
from jobs.settings import Settings
from jobs.storage import Storage, StorageUnavailable
from jobs.timeutil import utcnow

log = logging.getLogger(__name__)

WINDOW_SECONDS = {"24h": 24 * 3600}
STEP_LEASE = timedelta(minutes=5)
UNFINISHED = (JobStatus.scheduled, JobStatus.queued, JobStatus.running)
RENEW_EVERY_LINES = 1000
# Validation of an abandoned batch is taken up by maintenance only after this long, so the
# API process that accepted the batch normally does it.
VALIDATION_GRACE = timedelta(seconds=60)
SessionScope = Callable[[], Any]


def line_job_id(batch_id: str, line: int) -> str:
    digest = hashlib.sha256(f"{batch_id}\x00{line}".encode()).hexdigest()
    return "job_" + digest[:24]


def _file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}\x00{kind}".encode()).hexdigest()[:24]


# --- checking lines ----------------------------------------------------------------------


@dataclass(frozen=True)
class ValidLine:
    line: int
    custom_id: str
    prepared: PreparedJob
    lora_id: str | None


MAX_CUSTOM_ID_CHARS = 512
MAX_PARAM_CHARS = 256
MAX_MESSAGE_CHARS = 1000


def _clip(text: str, limit: int) -> str:
    """Text a line error can always be stored with, whatever the line held: NUL and lone
    surrogates escaped, and no longer than its column."""
    text = text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class InvalidLine:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", _clip(self.message, MAX_MESSAGE_CHARS))
        if self.param is not None:
            object.__setattr__(self, "param", _clip(self.param, MAX_PARAM_CHARS))


AdapterLookup = Callable[[ModelSpec, str], str]


def _custom_id_problem(custom_id: Any) -> str | None:
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id is required, as a non-empty string"
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters"
    try:
        storable_text(custom_id)
    except ValueError as exc:
        return f"custom_id {exc}"
    return None


class LineChecker:
    """Checks lines one at a time, remembering the custom_ids seen so far. Whatever a line
    holds, it becomes a valid line or an invalid one with its number: never an exception."""

    def __init__(self, endpoint: str, settings: Settings, adapter_id: AdapterLookup | None) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.adapter_id = adapter_id
        self.seen: set[str] = set()

    def check(self, number: int, raw: bytes | None) -> ValidLine | InvalidLine:
        try:
            return self._check(number, raw)
        except (SQLAlchemyError, StorageUnavailable):
            raise  # the database or storage failed, not the line: the step is tried again
        except Exception as exc:  # a line we did not foresee fails alone, not its batch
            log.warning("line %d could not be checked", number, exc_info=True)
            message = f"line {number}: could not be read ({type(exc).__name__})"
            return InvalidLine(number, None, "invalid_request", message)

    def _check(self, number: int, raw: bytes | None) -> ValidLine | InvalidLine:
        custom_id: str | None = None

        def invalid(code: str, message: str, param: str | None = None) -> InvalidLine:
            return InvalidLine(number, custom_id, code, f"line {number}: {message}", param)

        if raw is None:
            return invalid("line_too_long", "longer than the largest request accepted")
        try:
            data = json.loads(raw)
        except RecursionError:
            return invalid("invalid_json", "not JSON we read (nested too deeply)")
        except ValueError as exc:  # not UTF-8, not JSON, an integer of thousands of digits
            return invalid("invalid_json", f"not JSON ({exc})")
        if not isinstance(data, dict):
            return invalid("invalid_request", "a line is a JSON object")
        if (problem := _custom_id_problem(data.get("custom_id"))) is not None:
            code = "missing_custom_id" if not data.get("custom_id") else "invalid_parameter"
            return invalid(code, problem, "custom_id")
        custom_id = data["custom_id"]
        if custom_id in self.seen:
            return invalid(
                "duplicate_custom_id", f"custom_id {custom_id!r} is used twice", "custom_id"
            )
        self.seen.add(custom_id)
        if data.get("url") != self.endpoint:
            return invalid(
                "invalid_url", f"url {data.get('url')!r} is not the batch's {self.endpoint}", "url"
            )
        try:
            request = BatchLine.model_validate(data)
        except ValidationError as exc:
            param, message = describe(main_error(exc.errors()), prefix="")
            return invalid("invalid_parameter", message, param)
        except MbatchError as exc:
            return invalid(exc.code, exc.message, exc.param)
        try:
            body = request.parsed_body()
            if body.model is None:
                body = body.model_copy(update={"model": self.settings.model})
            prepared = prepare_openai(body, self.settings)
            lora_id = None
            if prepared.lora is not None and self.adapter_id is not None:
                lora_id = self.adapter_id(prepared.spec, prepared.lora)
        except ValidationError as exc:
            param, message = describe(main_error(exc.errors()), prefix="body")
            return invalid("invalid_parameter", message, param)
        except MbatchError as exc:
            return invalid(exc.code, exc.message, f"body.{exc.param}" if exc.param else None)
        return ValidLine(number, custom_id, prepared, lora_id)


def owner_adapters(session: Session, owner: str) -> AdapterLookup:
    """Adapter lookups for one owner, each (model, name) asked of the database once, whether
    it is found or refused."""
    known: dict[tuple[str, str], str | InvalidParameter] = {}

    def lookup(spec: ModelSpec, lora: str) -> str:
        key = (spec.name, lora)
        if key not in known:
            try:
                known[key] = adapter_for_job(session, owner, spec, lora).id
            except InvalidParameter as refused:  # a name refused once is refused on every line
                known[key] = refused
        found = known[key]
        if isinstance(found, InvalidParameter):
            raise found.with_traceback(None)  # raised again: its old traceback would pile up
        return found

    return lookup


def check_file(
    stream: BinaryIO, checker: LineChecker, max_line_bytes: int
) -> Iterator[ValidLine | InvalidLine]:
    """Every non-blank line of a file, checked, in order."""
    for number, raw in enumerate(files.read_lines(stream, max_line_bytes), start=1):
        if raw is not None and not raw.strip():
            continue
        yield checker.check(number, raw)


# --- creating, estimating ----------------------------------------------------------------


def input_file(session: Session, owner: str, file_id: str) -> FileObject:
    try:
        file = files.get_file(session, owner, file_id)
    except NotFound:
        raise NotFound(f"no file {file_id}", param="input_file_id") from None
    if file.purpose != files.INPUT_PURPOSE:
        raise InvalidParameter("input_file_id", file_id, 'not a file of purpose "batch"')
    return file


def create_batch(
    session: Session,
    owner: str,
    body: BatchCreate,
    settings: Settings,
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """Record a batch in `validating`; returns it and whether it is new (an idempotency key
    seen before returns the batch it made)."""
    key = idempotency_key or body.idempotency_key
    if key is not None and (found := _by_key(session, owner, key)) is not None:
        return found, False
    file = input_file(session, owner, body.input_file_id)
    window = settings.batch_window_seconds or WINDOW_SECONDS[body.completion_window]
    now = utcnow()
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        owner=owner,
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        status=BatchStatus.validating,
        metadata_=body.metadata,
        callback_url=body.callback_url,
        idempotency_key=key,
        max_cost=body.max_cost,
        total=file.lines,
        invalid=0,
        completed=0,
        failed=0,
        created_at=now,
        expires_at=now + timedelta(seconds=window),
    )
    return add_once(session, batch, lambda: _by_key(session, owner, key) if key else None)


def _by_key(session: Session, owner: str, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key))


def estimate(
    session: Session | None,
    storage_stream: BinaryIO,
    owner: str,
    file_id: str,
    endpoint: str,
    settings: Settings,
) -> BatchEstimate:
    """A dry run: every line checked and its prompt tokens counted exactly, nothing run. The
    cost runs from the prompts alone to every line using all its max_tokens."""
    lookup = owner_adapters(session, owner) if session is not None else None
    checker = LineChecker(endpoint, settings, lookup)
    prompt_tokens = max_completion = total = 0
    low = high = Decimal(0)
    errors: list[dict[str, Any]] = []
    for result in check_file(storage_stream, checker, settings.max_request_bytes):
        total += 1
        if isinstance(result, InvalidLine):
            errors.append(_line_error_dict(result))
            continue
        tokens, budget = result.prepared.prompt_tokens, result.prepared.sampling.max_tokens
        prompt_tokens += tokens
        max_completion += budget
        low += price(result.prepared.spec, tokens, 0).total
        high += price(result.prepared.spec, tokens, budget).total
    return BatchEstimate(
        input_file_id=file_id,
        endpoint=endpoint,
        total_lines=total,
        valid_lines=total - len(errors),
        invalid_lines=len(errors),
        prompt_tokens=prompt_tokens,
        max_completion_tokens=max_completion,
        cost={"currency": "USD", "min": float(low), "max": float(high)},
        errors=errors[:100],
    )


def _line_error_dict(line: InvalidLine) -> dict[str, Any]:
    return {"code": line.code, "message": line.message, "param": line.param, "line": line.line}


# --- validating: lines become jobs -------------------------------------------------------


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now)


@dataclass
class Step:
    """A batch's step (validating, finalizing) as one call runs it. Taking it sets a token on
    the batch row; only the token's holder renews the step's lease, ends the step or records
    its failure, so a process that lost the step (its lease lapsed and another took it) can
    no longer act on the batch."""

    batch_id: str
    name: str
    token: str | None = None

    def held(self) -> tuple[ColumnElement[bool], ...]:
        return (Batch.id == self.batch_id, Batch.step_token == self.token)


# The attempt-based pause never grows past this.
MAX_STEP_PAUSE = timedelta(hours=6)
# Fields that start afresh whenever a batch moves to another step.
STEP_RESET: dict[str, Any] = {
    "lease_expires_at": None,
    "step_token": None,
    "step_attempts": 0,
    "step_error": None,
}


def _take_step(
    session: Session, settings: Settings, step: Step, statuses: Iterable[BatchStatus]
) -> Batch | None:
    """Take the batch's step if it is in one of `statuses` and nobody holds it. A step taken
    as often as it may be without ever ending (its process died each time) ends the batch."""
    now, token = utcnow(), secrets.token_hex(16)
    taken = session.execute(
        update(Batch)
        .where(Batch.id == step.batch_id, Batch.status.in_(list(statuses)), _lease_free(now))
        .values(
            lease_expires_at=now + STEP_LEASE,
            step_token=token,
            step_attempts=Batch.step_attempts + 1,
        )
    )
    session.commit()
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None
    step.token = token
    batch = session.scalars(
        select(Batch).where(*step.held()).execution_options(populate_existing=True)
    ).one()
    if batch.step_attempts > settings.batch_step_attempts:
        _give_up(session, batch, tries=batch.step_attempts - 1)  # this take does not run
        session.commit()
        return None
    return batch


def _renew_step(scope: SessionScope, step: Step) -> bool:
    """Keep a long step's lease; False once the step is no longer ours."""
    with scope() as session:
        renewed = session.execute(
            update(Batch).where(*step.held()).values(lease_expires_at=utcnow() + STEP_LEASE)
        )
        session.commit()
        return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]


@contextmanager
def _step_guard(
    scope: SessionScope, settings: Settings, batch_id: str, name: str
) -> Iterator[Step]:
    """Runs a step so that an error never breaks whoever called it: one batch's failure
    does not stop another batch's step in the same pass. The failure is recorded on the
    batch, which tries the step again later (see `_step_failed`)."""
    step = Step(batch_id, name)
    try:
        yield step
    except Exception as exc:
        log.exception("batch %s: %s failed", batch_id, name)
        if step.token is None:
            return  # failed before it took the step: nothing of the batch's to record
        try:
            with scope() as session:
                _step_failed(session, settings, step, exc)
        except Exception:  # the database is away too: the lease lapses and it runs again
            log.exception("batch %s: could not record that %s failed", batch_id, name)


def _public_reason(exc: BaseException) -> str:
    """Why a step failed, as the batch's owner may read it: no SQL, hosts or traces."""
    if isinstance(exc, MbatchError):
        return exc.message
    return f"an internal error ({type(exc).__name__})"


def _step_failed(session: Session, settings: Settings, step: Step, exc: BaseException) -> None:
    """An outage of ours is waited out, at a steady pace, and does not count as a try. Any
    other failure is tried again after a pause that grows fourfold with each try; past
    `batch_step_attempts` tries the batch ends `failed`, saying why."""
    batch = session.scalar(select(Batch).where(*step.held()).with_for_update())
    if batch is None or batch.status.finished:
        return  # no longer ours to judge
    batch.step_token = None
    down = unavailable(exc)
    if down is not None:
        batch.step_attempts -= 1
        batch.step_error = f"{step.name} is waiting: {down} is unavailable"
        pause = timedelta(seconds=settings.batch_step_retry_seconds)
    else:
        batch.step_error = _clip(f"{step.name} failed: {_public_reason(exc)}", MAX_MESSAGE_CHARS)
        if batch.step_attempts >= settings.batch_step_attempts:
            _give_up(session, batch, tries=batch.step_attempts)
            session.commit()
            return
        growth = 4 ** min(max(batch.step_attempts - 1, 0), 16)
        pause = min(timedelta(seconds=settings.batch_step_retry_seconds * growth), MAX_STEP_PAUSE)
    batch.lease_expires_at = utcnow() + pause
    session.commit()


def _give_up(session: Session, batch: Batch, tries: int) -> None:
    """The batch ends `failed`, saying why; its lines that have not ended are cancelled, and
    its counts keep the lines that did."""
    why = batch.step_error or "the process working on it stopped each time"
    message = f"the batch could not be processed in {tries} tries: {why}"
    _stop_jobs(session, batch.id, "batch_failed", message)
    counts = job_counts(session, batch.id)
    batch.completed = counts.get(JobStatus.succeeded, 0)
    batch.failed = batch.invalid + counts.get(JobStatus.failed, 0)
    batch.failed += counts.get(JobStatus.cancelled, 0)
    batch.status, batch.failed_at = BatchStatus.failed, utcnow()
    batch.lease_expires_at = batch.step_token = None
    batch.errors = [{"code": "batch_processing_failed", "message": message}]
    log.error("batch %s failed: %s", batch.id, message)


def _job_row(batch: Batch, line: ValidLine) -> dict[str, Any]:
    prepared, now = line.prepared, utcnow()
    return {
        "id": line_job_id(batch.id, line.line),
        "owner": batch.owner,
        "model": prepared.spec.name,
        "lora": prepared.lora,
        "lora_id": line.lora_id,
        "status": JobStatus.queued,
        "input": prepared.input,
        "sampling": prepared.sampling.to_dict(),
        "prompt_tokens": prepared.prompt_tokens,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "file_batch_id": batch.id,
        "custom_id": line.custom_id,
        "line": line.line,
    }


def _insert_ignoring_duplicates(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(postgresql.insert(table).on_conflict_do_nothing(), rows)
    else:
        session.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)


def validate_batch(
    scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings, batch_id: str
) -> None:
    """The batch's `validating` step: each line checked, good lines enqueued as jobs in
    chunks, bad lines recorded with their line number and why. Ends `in_progress`, or
    `failed` when no line was good."""
    with _step_guard(scope, settings, batch_id, "validation") as step:
        _validate(scope, storage, queue, settings, step)


def _validate(
    scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings, step: Step
) -> None:
    with scope() as session:
        batch = _take_step(session, settings, step, [BatchStatus.validating])
        if batch is None:
            return
        session.expunge(batch)
        file = session.get(FileObject, batch.input_file_id)
        if file is not None:
            session.expunge(file)
    if file is None:
        _fail(scope, step, "file_not_found", "the input file was deleted")
        return
    try:
        stream = files.open_stored(storage, file, "input_file_id")
    except files.ContentUnavailable as gone:  # for good: no try would find it
        _fail(scope, step, gone.code, gone.message)
        return
    total = invalid = 0
    with scope() as session, stream:
        checker = LineChecker(batch.endpoint, settings, owner_adapters(session, batch.owner))
        pending: list[ValidLine | InvalidLine] = []
        for result in check_file(stream, checker, settings.max_request_bytes):
            total += 1
            invalid += isinstance(result, InvalidLine)
            pending.append(result)
            if len(pending) >= settings.batch_chunk_lines:
                if not _enqueue(session, queue, settings, batch, step, pending):
                    return  # cancelled, expired or taken over meanwhile
                pending = []
        if not _enqueue(session, queue, settings, batch, step, pending):
            return
    with scope() as session:
        now = utcnow()
        values: dict[str, Any] = {"total": total, "invalid": invalid, **STEP_RESET}
        if total == invalid:
            values.update(status=BatchStatus.finalizing, finalizing_at=now)
        else:
            values.update(status=BatchStatus.in_progress, in_progress_at=now)
        session.execute(
            update(Batch)
            .where(*step.held(), Batch.status == BatchStatus.validating)
            .values(**values)
        )
        session.commit()
    log.info("batch %s validated: %d lines, %d refused", batch.id, total, invalid)
    # Lines may have run while the rest were checked: the last of them found the batch
    # still validating, so whether it has ended is asked now.
    finalize(scope, storage, settings, batch.id)


def _enqueue(
    session: Session,
    queue: JobQueue,
    settings: Settings,
    batch: Batch,
    step: Step,
    results: list[ValidLine | InvalidLine],
) -> bool:
    """Record one chunk of checked lines, if the batch is still validating and the step
    still ours (its lease renewed with it); then wake the workers, one message per batch's
    worth of jobs (a message only says there is work)."""
    status = session.scalar(select(Batch.status).where(*step.held()).with_for_update())
    if status != BatchStatus.validating:
        session.rollback()
        return False
    jobs = [_job_row(batch, r) for r in results if isinstance(r, ValidLine)]
    errors = [
        {
            "batch_id": batch.id,
            "line": r.line,
            "custom_id": r.custom_id,
            "code": r.code,
            "message": r.message,
            "param": r.param,
        }
        for r in results
        if isinstance(r, InvalidLine)
    ]
    _insert_ignoring_duplicates(session, Job.__table__, jobs)
    _insert_ignoring_duplicates(session, LineError.__table__, errors)
    session.execute(
        update(Batch).where(*step.held()).values(lease_expires_at=utcnow() + STEP_LEASE)
    )
    session.commit()
    for model in {job["model"] for job in jobs}:
        ids = [job["id"] for job in jobs if job["model"] == model]
        for job_id in ids[:: settings.max_batch_size]:
            try:
                queue.publish(job_id, resolve_model(model).queue)
            except Exception:  # the broker is away: maintenance publishes queued jobs later
                log.exception("could not publish batch %s's jobs", batch.id)
                break
    return True


def _fail(scope: SessionScope, step: Step, code: str, message: str) -> None:
    """The batch cannot be validated, and no try would change that: it ends `failed`."""
    with scope() as session:
        session.execute(
            update(Batch)
            .where(*step.held(), Batch.status == BatchStatus.validating)
            .values(
                status=BatchStatus.failed,
                failed_at=utcnow(),
                errors=[{"code": code, "message": message}],
                **STEP_RESET,
            )
        )
        session.commit()


# --- progress, cancel, expiry ------------------------------------------------------------


def job_counts(session: Session, batch_id: str) -> dict[JobStatus, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.file_batch_id == batch_id).group_by(Job.status)
    ).all()
    return {status: count for status, count in rows}


def request_counts(session: Session, batch: Batch) -> RequestCounts:
    if batch.status.finished:
        return RequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed)
    counts = job_counts(session, batch.id)
    return RequestCounts(
        total=batch.total,
        completed=counts.get(JobStatus.succeeded, 0),
        failed=batch.invalid + counts.get(JobStatus.failed, 0) + counts.get(JobStatus.cancelled, 0),
    )


def _spent(session: Session, batch_id: str) -> tuple[int, int, Decimal]:
    """Prompt tokens, completion tokens and exact cost of the batch's succeeded lines."""
    prompt, completion, cost_in, cost_out = session.execute(
        select(
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.cost_input), 0),
            func.coalesce(func.sum(Job.cost_output), 0),
        ).where(Job.file_batch_id == batch_id, Job.status == JobStatus.succeeded)
    ).one()
    return int(prompt or 0), int(completion or 0), Decimal(cost_in or 0) + Decimal(cost_out or 0)


def usage(session: Session, batch_id: str) -> dict[str, Any]:
    """Tokens and cost of the batch's lines that have finished."""
    prompt, completion, cost = _spent(session, batch_id)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated_cost": float(cost),
    }


def _stop_jobs(session: Session, batch_id: str, code: str, message: str) -> None:
    """Cancel the batch's jobs that have not finished; a running one's result is dropped."""
    session.execute(
        update(Job)
        .where(Job.file_batch_id == batch_id, Job.status.in_(UNFINISHED))
        .values(
            status=JobStatus.cancelled,
            finished_at=utcnow(),
            claim_token=None,
            error_code=code,
            error_message=message,
        )
    )


def cancel_batch(session: Session, batch: Batch) -> Batch:
    """Stop a batch: it is `cancelling` until its files are written, then `cancelled`."""
    if batch.status.finished:
        raise Conflict(f"batch {batch.id} has already ended ({batch.status.value})", param="id")
    # A finalizing batch has no line left to stop: it ends as it would have.
    stoppable = [BatchStatus.validating, BatchStatus.in_progress]
    stopped = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_(stoppable))
        .values(status=BatchStatus.cancelling, cancelling_at=utcnow(), **STEP_RESET)
    )
    if stopped.rowcount == 1:  # type: ignore[attr-defined]
        _stop_jobs(session, batch.id, "batch_cancelled", "the batch was cancelled")
    session.commit()
    session.refresh(batch)
    return batch


def enforce_max_cost(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Stop batches whose spent cost has passed their `max_cost`: they end `cancelled`, with
    what finished. Checked after each static batch, so one static batch may overshoot."""
    stopped = []
    capped = session.scalars(
        select(Batch).where(
            Batch.id.in_(list(batch_ids)),
            Batch.max_cost.is_not(None),
            Batch.status == BatchStatus.in_progress,
        )
    ).all()
    for batch in capped:
        *_, spent = _spent(session, batch.id)
        if batch.max_cost is None or spent <= batch.max_cost:
            continue
        message = f"spent ${spent} of max_cost ${batch.max_cost}"
        session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.status == BatchStatus.in_progress)
            .values(
                status=BatchStatus.cancelling,
                cancelling_at=utcnow(),
                **STEP_RESET,
                errors=[{"code": "max_cost_reached", "message": message}],
            )
        )
        _stop_jobs(session, batch.id, "max_cost_reached", message)
        stopped.append(batch.id)
    session.commit()
    return stopped


def expire_due(session: Session) -> list[str]:
    """Batches past their completion window stop; their files hold what finished."""
    running = [BatchStatus.validating, BatchStatus.in_progress]
    # In one order everywhere, so that two maintenance passes never wait on each other.
    due = session.scalars(
        select(Batch.id)
        .where(Batch.status.in_(running), Batch.expires_at < utcnow())
        .order_by(Batch.id)
    ).all()
    expired = []
    for batch_id in due:
        moved = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(running))
            .values(
                status=BatchStatus.finalizing,
                expired_at=utcnow(),
                finalizing_at=utcnow(),
                **STEP_RESET,
            )
        )
        if moved.rowcount == 1:  # type: ignore[attr-defined]
            _stop_jobs(session, batch_id, "batch_expired", "the batch's completion window ended")
            expired.append(batch_id)
    session.commit()
    return expired


# --- finalizing: output and error files --------------------------------------------------


def finalize(scope: SessionScope, storage: Storage, settings: Settings, batch_id: str) -> bool:
    """Write the output and error files of a batch whose lines have all ended, and give it
    its final status. False where there is nothing to do yet."""
    done = False
    with _step_guard(scope, settings, batch_id, "finalizing") as step:
        done = _finalize(scope, storage, settings, step)
    return done


def _unfinished_lines(session: Session, batch_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.file_batch_id == batch_id, Job.status.in_(UNFINISHED))
        )
        or 0
    )


def _begin_finalizing(session: Session, batch_id: str) -> None:
    """An in-progress batch whose lines have all ended moves on to `finalizing`. Looked at
    under the batch row's lock: of two workers that record its last two lines at once, the
    second looks after the first has, sees both lines ended, and the batch moves on at once
    rather than at the next maintenance pass."""
    if _unfinished_lines(session, batch_id):
        return  # the common case, after each static batch: no lock taken
    batch = session.scalar(
        select(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.in_progress)
        .with_for_update()
    )
    if batch is not None and not _unfinished_lines(session, batch_id):
        batch.status, batch.finalizing_at = BatchStatus.finalizing, utcnow()
    session.commit()


def _finalize(scope: SessionScope, storage: Storage, settings: Settings, step: Step) -> bool:
    with scope() as session:
        _begin_finalizing(session, step.batch_id)
        batch = _take_step(
            session, settings, step, [BatchStatus.finalizing, BatchStatus.cancelling]
        )
        if batch is None:
            return False
        session.expunge(batch)
    if batch.status == BatchStatus.cancelling:
        final = BatchStatus.cancelled
    elif batch.expired_at is not None:
        final = BatchStatus.expired
    elif batch.total and batch.invalid == batch.total:
        final = BatchStatus.failed
    else:
        final = BatchStatus.completed

    with scope() as session:
        lost: list[tuple[int, dict[str, Any]]] = []
        output = _output_lines(session, storage, batch, lost)
        output_id, completed = _write_file(session, storage, scope, step, batch, "output", output)
        errors = _error_lines(session, batch, lost)
        error_id, failed = _write_file(session, storage, scope, step, batch, "errors", errors)
        values: dict[str, Any] = {
            "status": final,
            f"{final.value}_at": utcnow(),
            "output_file_id": output_id,
            "error_file_id": error_id,
            "completed": completed,
            "failed": failed,
            **STEP_RESET,
        }
        if final == BatchStatus.failed:
            first = session.scalars(
                select(LineError)
                .where(LineError.batch_id == batch.id)
                .order_by(LineError.line)
                .limit(100)
            ).all()
            values["errors"] = [
                {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                for e in first
            ]
        ended = session.execute(
            update(Batch)
            .where(*step.held(), Batch.status.in_([BatchStatus.finalizing, BatchStatus.cancelling]))
            .values(**values)
        )
        session.commit()
    if ended.rowcount != 1:  # type: ignore[attr-defined]
        log.warning("batch %s: finalizing was taken over; its files are the other's", batch.id)
        return False
    log.info("batch %s %s: %d completed, %d failed", batch.id, final.value, completed, failed)
    return True


class StepTakenOver(Exception):
    """The step's lease lapsed and another process took it: this one stops."""


def _write_file(
    session: Session,
    storage: Storage,
    scope: SessionScope,
    step: Step,
    batch: Batch,
    kind: str,
    lines: Iterable[dict[str, Any]],
) -> tuple[str | None, int]:
    """One of the batch's files. Writing a large batch's file out takes longer than a lease
    lasts, so the step's lease is renewed as it goes."""
    count = 0
    with tempfile.TemporaryFile() as out:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            count += 1
            if count % RENEW_EVERY_LINES == 0 and not _renew_step(scope, step):
                raise StepTakenOver(f"batch {batch.id}: {step.name} was taken over")
        if not count:
            return None, 0
        out.seek(0)
        file_id = _file_id(batch.id, kind)
        files.save_output(
            session, storage, batch.owner, file_id, f"{batch.id}_{kind}.jsonl", out, count
        )
        session.commit()
    return file_id, count


def _jobs_of(session: Session, batch_id: str, *condition: Any) -> Iterator[Job]:
    query = (
        select(Job)
        .where(Job.file_batch_id == batch_id, *condition)
        .order_by(Job.line)
        .execution_options(yield_per=500)
    )
    yield from session.scalars(query)


def _output_lines(
    session: Session, storage: Storage, batch: Batch, lost: list[tuple[int, dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    """The output file's lines; a line whose stored result is gone or unreadable is added to
    `lost`, as the error line it becomes, rather than failing the whole file (an outage still
    raises: the step waits it out)."""
    for job in _jobs_of(session, batch.id, Job.status == JobStatus.succeeded):
        try:
            text = response_text(job, storage) or ""
        except KeyError:
            message = "the result was recorded but its stored copy is gone"
            line = job.line or 0
            lost.append(
                (line, error_line(job.id, job.custom_id, line, RESULT_UNAVAILABLE, message))
            )
            continue
        yield output_line(job, text, batch.endpoint)


def _error_lines(
    session: Session, batch: Batch, lost: list[tuple[int, dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    """The error file's lines, in line order: refused lines, lines that did not succeed,
    and lines whose result was lost (read after the output file was written)."""
    refused = (
        (
            e.line,
            error_line(
                line_job_id(batch.id, e.line), e.custom_id, e.line, e.code, e.message, e.param
            ),
        )
        for e in session.scalars(
            select(LineError).where(LineError.batch_id == batch.id).order_by(LineError.line)
        )
    )
    ended = (
        (
            job.line or 0,
            error_line(
                job.id,
                job.custom_id,
                job.line or 0,
                job.error_code or "failed",
                job.error_message or "the request failed",
            ),
        )
        for job in _jobs_of(session, batch.id, Job.status != JobStatus.succeeded)
    )
    by_line = heapq.merge(refused, ended, lost, key=lambda pair: pair[0])
    return (line for _, line in by_line)


# --- maintenance -------------------------------------------------------------------------


def advance(scope: SessionScope, storage: Storage, queue: JobQueue, settings: Settings) -> None:
    """Expire batches past their window, take up validation that failed or that a process
    abandoned, and finalize batches whose lines have all ended. Each batch's step is run on
    its own: one that fails is tried again later and does not stop the others."""
    now = utcnow()
    try:
        with scope() as session:
            expire_due(session)
    except Exception:
        log.exception("could not expire batches; the next pass tries again")
    with scope() as session:
        abandoned = list(
            session.scalars(
                select(Batch.id).where(
                    Batch.status == BatchStatus.validating,
                    # Left by its API process, or tried before: not the first take's to wait.
                    or_(
                        Batch.created_at < now - VALIDATION_GRACE,
                        Batch.step_attempts > 0,
                        Batch.step_error.is_not(None),
                    ),
                    _lease_free(now),
                )
            )
        )
        unfinished = exists().where(and_(Job.file_batch_id == Batch.id, Job.status.in_(UNFINISHED)))
        ready = list(
            session.scalars(
                select(Batch.id).where(
                    or_(
                        and_(Batch.status == BatchStatus.in_progress, ~unfinished),
                        Batch.status.in_([BatchStatus.finalizing, BatchStatus.cancelling]),
                    ),
                    _lease_free(now),
                )
            )
        )
    for batch_id in abandoned:
        validate_batch(scope, storage, queue, settings, batch_id)
    for batch_id in ready:
        finalize(scope, storage, settings, batch_id)


def finalize_if_done(
    scope: SessionScope, storage: Storage, settings: Settings, batch_ids: Iterable[str]
) -> None:
    for batch_id in set(batch_ids):
        finalize(scope, storage, settings, batch_id)


def get_batch(session: Session, owner: str, batch_id: str) -> Batch:
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.owner == owner))
    if batch is None:
        raise NotFound(f"no batch {batch_id}", param="batch_id")
    return batch


def list_batches(
    session: Session, owner: str, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """Newest first; `after` is the id of the last batch of the page before."""
    query = select(Batch).where(Batch.owner == owner)
    if after is not None:
        anchor = session.scalar(select(Batch).where(Batch.id == after, Batch.owner == owner))
        if anchor is None:
            raise InvalidParameter("after", after, "no batch of yours has this id")
        query = query.where(
            or_(
                Batch.created_at < anchor.created_at,
                and_(Batch.created_at == anchor.created_at, Batch.id < anchor.id),
            )
        )
    rows = list(
        session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def retry_failed(
    session: Session, storage: Storage, owner: str, batch: Batch, settings: Settings
) -> Batch:
    """A new batch of the lines of `batch` that did not succeed, from a new input file."""
    if not batch.status.finished:
        raise Conflict(f"batch {batch.id} has not ended ({batch.status.value})", param="id")
    source = session.get(FileObject, batch.input_file_id)
    if source is None:
        raise Conflict(f"the input file of batch {batch.id} was deleted", param="id")
    succeeded = set(
        session.scalars(
            select(Job.line).where(Job.file_batch_id == batch.id, Job.status == JobStatus.succeeded)
        )
    )
    with tempfile.TemporaryFile() as out, files.open_stored(storage, source, "id") as stream:
        kept = 0
        for number, raw in enumerate(files.read_lines(stream, 1 << 62), start=1):
            if raw is None or not raw.strip() or number in succeeded:
                continue
            out.write(raw + b"\n")
            kept += 1
        if not kept:
            raise Conflict(f"batch {batch.id} has no failed lines", param="id")
        file = files.create_file(
            session,
            storage,
            owner,
            f"{batch.id}_retry.jsonl",
            files.INPUT_PURPOSE,
            out,  # type: ignore[arg-type]
            max_bytes=1 << 62,
            max_lines=1 << 62,
        )
    body = BatchCreate(
        input_file_id=file.id,
        endpoint=batch.endpoint,  # type: ignore[arg-type]
        metadata=batch.metadata_,
        callback_url=batch.callback_url,
        max_cost=batch.max_cost,
    )
    retry, _ = create_batch(session, owner, body, settings)
    retry.retry_of = batch.id
    session.commit()
    return retry
