"""Job submission and its checks, shared by every way a job comes in."""

import hashlib
import logging
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from jobs import cache, queries
from jobs.db import add_once
from jobs.errors import Conflict, InvalidParameter
from jobs.loras import adapter_for_job
from jobs.models import Job, JobStatus, Lane
from jobs.queue import JobQueue
from jobs.registry import ModelSpec, resolve_model
from jobs.sampling import SamplingParams
from jobs.schemas.base import SamplingRequest
from jobs.schemas.native import JobCreate
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.timeutil import utcnow
from jobs.tokenizer import encode_job_input, v1_tokenizer
from jobs.webhooks.addresses import check_callback_url
from jobs.webhooks.events import job_ended

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    """A validated request of either dialect, ready to be recorded."""

    spec: ModelSpec
    input: dict[str, Any]
    sampling: SamplingParams
    prompt_tokens: int
    lora: str | None = None
    metadata: dict[str, str] | None = None
    callback_url: str | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None
    # Answer it from the owner's result cache where it is deterministic (`jobs.cache`).
    cache: bool = False
    # The lane it is claimed from, and whether its text streams while it decodes.
    lane: Lane = Lane.native
    stream: bool = False


def job_id_for(owner: str, idempotency_key: str | None) -> str:
    """Deterministic for an idempotency key, so a retried submission names the same job."""
    if idempotency_key is None:
        return "job_" + secrets.token_hex(12)
    digest = hashlib.sha256(f"{owner}\x00{idempotency_key}".encode()).hexdigest()
    return "job_" + digest[:24]


def check_lora(spec: ModelSpec, lora: str | None) -> None:
    if lora is not None and not spec.allows_lora:
        raise InvalidParameter("lora", lora, f"model {spec.name} does not take LoRA adapters")


def adapter_id_for(session: Session, owner: str, prepared: PreparedJob) -> str | None:
    """The id of the adapter a job names; another owner's, or one made for another model,
    is refused as if it did not exist for this job."""
    if prepared.lora is None:
        return None
    return adapter_for_job(session, owner, prepared.spec, prepared.lora).id


def check_context(
    spec: ModelSpec, prompt_tokens: int, max_tokens: int, param: str = "prompt"
) -> None:
    if prompt_tokens >= spec.context_length:
        raise InvalidParameter(
            param,
            f"<{prompt_tokens} tokens>",
            f"the prompt alone is {prompt_tokens} tokens; {spec.name} takes "
            f"{spec.context_length} in all",
        )
    if max_tokens > spec.context_length:
        raise InvalidParameter(
            "max_tokens", max_tokens, f"{spec.name} has a context of {spec.context_length} tokens"
        )


def _prepare(body: SamplingRequest, settings: Settings) -> PreparedJob:
    """The checks and conversions every request gets, whatever its dialect."""
    job_input = body.input_record()
    spec = resolve_model(body.model or settings.model)
    check_lora(spec, body.lora)
    sampling = body.to_sampling_params(spec)
    prompt_tokens = len(encode_job_input(v1_tokenizer(), job_input))
    check_context(spec, prompt_tokens, sampling.max_tokens, next(iter(job_input)))
    return PreparedJob(
        spec=spec, input=job_input, sampling=sampling, prompt_tokens=prompt_tokens, lora=body.lora
    )


def prepare_native(body: JobCreate, settings: Settings) -> PreparedJob:
    prepared = _prepare(body, settings)
    if body.callback_url is not None:
        check_callback_url(body.callback_url, settings.webhook_allow_private)
    return replace(
        prepared,
        metadata=body.metadata,
        callback_url=body.callback_url,
        run_at=body.run_at,
        idempotency_key=body.idempotency_key,
        cache=body.cache,
    )


def prepare_openai(body: SamplingRequest, settings: Settings) -> PreparedJob:
    """An OpenAI chat or completion body (`BatchLine.parsed_body()`)."""
    return _prepare(body, settings)


def _cache_key(session: Session, prepared: PreparedJob, lora_id: str | None) -> str | None:
    """The job's key in the result cache, where it asked for the cache and is deterministic."""
    if not prepared.cache:
        return None
    row: dict[str, Any] = {
        "model": prepared.spec.name,
        "lora_id": lora_id,
        "input": prepared.input,
        "sampling": prepared.sampling.to_dict(),
    }
    cache.set_keys(session, [row])
    return row["cache_key"]


def submit_job(
    session: Session,
    queue: JobQueue,
    owner: str,
    prepared: PreparedJob,
    idempotency_key: str | None = None,
    storage: Storage | None = None,
) -> tuple[Job, bool]:
    """Record and enqueue one job; returns the job and whether it is new.

    The row is committed before the message is published: a publish that fails leaves a
    queued job that maintenance publishes again, never a message without a job. A job that
    asked for the cache and whose request has a live entry is recorded as succeeded with
    the entry's answer instead, and never queued (a large answer is copied in `storage`;
    without one, such an entry is missed). A job scheduled for later is not looked up: it
    runs when it is due.
    """
    key = idempotency_key or prepared.idempotency_key
    if key is not None:
        existing = queries.find_by_idempotency_key(session, owner, key)
        if existing is not None:
            return existing, False
    lora_id = adapter_id_for(session, owner, prepared)
    scheduled = prepared.run_at is not None and prepared.run_at > utcnow()
    cache_key = _cache_key(session, prepared, lora_id)
    hit = None
    if cache_key is not None and not scheduled:
        hit = cache.find_hits(session, storage, owner, [cache_key]).get(cache_key)
    job_id = job_id_for(owner, key)
    job = Job(
        id=job_id,
        owner=owner,
        model=prepared.spec.name,
        lora=prepared.lora,
        lora_id=lora_id,
        status=JobStatus.scheduled if scheduled else JobStatus.queued,
        input=prepared.input,
        sampling=prepared.sampling.to_dict(),
        metadata_=prepared.metadata,
        callback_url=prepared.callback_url,
        idempotency_key=key,
        run_at=prepared.run_at,
        prompt_tokens=prepared.prompt_tokens,
        attempts=0,
        created_at=utcnow(),
        cache_key=cache_key,
        lane=prepared.lane.value,
        stream=prepared.stream,
    )
    if hit is not None:
        for name, value in hit.job_values(job_id, utcnow()).items():
            setattr(job, name, value)
    job, created = add_once(
        session, job, lambda: queries.find_by_idempotency_key(session, owner, key) if key else None
    )
    if created and hit is not None:
        # Ended as it was made: its copy of the answer and its webhook event commit with it.
        hit.store_copy(storage, job.id)
        job_ended(session, owner, job.id, JobStatus.succeeded.value, job.callback_url)
    if created:
        # The one place a function here commits the caller's unit of work: a message must
        # never name a row that a worker cannot see yet.
        session.commit()
        if not scheduled and hit is None:
            publish(session, queue, [job])
    return job, created


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Cancel one of `owner`'s jobs that has not finished (flushed; the unit of work commits
    it); Conflict for one that has."""
    job = queries.get_owned_job(session, owner, job_id)
    if job.status.finished:
        raise Conflict(f"job {job_id} has already finished ({job.status.value})", param="id")
    return queries.cancel(session, job)


def publish(session: Session, queue: JobQueue, jobs: list[Job]) -> None:
    """Publish jobs' messages; a failure is logged, and maintenance tries again later."""
    published = []
    for job in jobs:
        try:
            queue.publish(job.id, resolve_model(job.model).queue)
        except Exception:  # the broker is down: the row stays queued and is not lost
            log.exception("could not publish job %s; maintenance will publish it again", job.id)
            continue
        published.append(job.id)
    if published:
        queries.mark_enqueued(session, published)
        session.commit()  # its own transaction: the messages are out, whatever comes next
