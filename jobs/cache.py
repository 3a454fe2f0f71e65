"""The result cache: a job or batch that asks for it with `"cache": true` has its
deterministic requests answered from an earlier identical request of the same owner, at
submission, without running.

A request's key is a sha256 over its model, its adapter's sha256 and the request as the job
stores it (its `input` and `sampling`, serialised canonically), so two requests share a key
exactly when the worker would decode them the same. Only deterministic requests (greedy, or
seeded) are keyed: the others are neither looked up nor stored. Entries are the owner's own
(looked up by owner and key) and live `cache_ttl_seconds`.

A job with a key stores its answer when it succeeds, in the transaction that records the
result (`remember`). A large answer is not copied then: the entry names the producing job's
stored object, and each job answered from it gets its own copy (`Hit`), so that every stored
result still belongs to exactly one job and goes with it at retention. An entry whose object
is gone (its job was deleted by retention) is dropped and counts as a miss.
"""

import hashlib
import json
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from jobs.db import insert_ignoring_duplicates
from jobs.models import CacheEntry, Job, JobStatus, LoraAdapter
from jobs.sampling import SamplingParams
from jobs.settings import CACHE_TTL_SECONDS
from jobs.storage import Storage, result_key
from jobs.timeutil import utcnow

log = logging.getLogger(__name__)

# Bumped when what goes into a key changes: older entries then simply stop matching.
KEY_VERSION = "mbatch-cache-v1"
# Sampling fields that are floats: `0` and `0.0` are the same request and get one key.
_FLOAT_FIELDS = frozenset(f.name for f in fields(SamplingParams) if f.type is float)


def is_deterministic(sampling: dict[str, Any]) -> bool:
    """Whether the request's answer is fixed by the request: greedy, or with a seed."""
    params = SamplingParams.from_dict(sampling)
    return params.greedy or params.seed is not None


def _normalised(sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        name: float(value)
        if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool)
        else value
        for name, value in sampling.items()
    }


def cache_key(
    model: str, adapter_sha256: str | None, job_input: dict[str, Any], sampling: dict[str, Any]
) -> str:
    """The key of a request, from what its job stores: hex sha256 of a canonical JSON."""
    document = {
        "version": KEY_VERSION,
        "model": model,
        "adapter_sha256": adapter_sha256,
        "input": job_input,
        "sampling": _normalised(sampling),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def adapter_hashes(session: Session, lora_ids: Iterable[str | None]) -> dict[str, str]:
    """The sha256 of each adapter named, in one query."""
    ids = sorted({lora_id for lora_id in lora_ids if lora_id is not None})
    if not ids:
        return {}
    columns = (LoraAdapter.sha256, LoraAdapter.rank, LoraAdapter.alpha, LoraAdapter.target_modules)
    rows = session.execute(select(LoraAdapter.id, *columns).where(LoraAdapter.id.in_(ids)))
    # The weights' hash and the config the worker applies them with: two uploads of the same
    # weights with another lora_alpha decode differently.
    return {
        lora_id: f"{sha256}:r{rank}:a{float(alpha)!r}:{','.join(sorted(targets))}"
        for lora_id, sha256, rank, alpha, targets in rows
    }


def set_keys(session: Session, rows: list[dict[str, Any]]) -> None:
    """Give each job row (`model`, `lora_id`, `input`, `sampling`) its `cache_key`: None for
    a request that is not deterministic."""
    hashes = adapter_hashes(session, (row["lora_id"] for row in rows))
    for row in rows:
        row["cache_key"] = None
        if row["lora_id"] is not None and row["lora_id"] not in hashes:
            continue  # its adapter is gone: never the base model's key
        if is_deterministic(row["sampling"]):
            adapter = hashes.get(row["lora_id"]) if row["lora_id"] is not None else None
            row["cache_key"] = cache_key(row["model"], adapter, row["input"], row["sampling"])


@dataclass(frozen=True)
class Hit:
    """A live entry, with the bytes of its answer where that is stored as an object."""

    entry: CacheEntry
    data: bytes | None = None

    def job_values(self, job_id: str, now: datetime) -> dict[str, Any]:
        """The values that record a job as answered by this entry: succeeded at once, with
        the entry's usage, at no cost."""
        entry = self.entry
        return {
            "status": JobStatus.succeeded,
            "cached": True,
            "response_text": entry.response_text,
            "response_uri": result_key(job_id) if self.data is not None else None,
            "finish_reason": entry.finish_reason,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "logprobs": entry.logprobs,
            "cost_input": Decimal(0),
            "cost_output": Decimal(0),
            "compute_seconds": 0.0,
            "enqueued_at": None,
            "started_at": now,
            "finished_at": now,
        }

    def store_copy(self, storage: Storage | None, job_id: str) -> None:
        """Write the job's own copy of a large answer (before its row commits)."""
        if self.data is not None:
            assert storage is not None  # a hit with data was read from it
            storage.put_bytes(result_key(job_id), self.data)


def find_hits(
    session: Session,
    storage: Storage | None,
    owner: str,
    keys: Collection[str],
    now: datetime | None = None,
) -> dict[str, Hit]:
    """The owner's live entries among `keys`, by key. An entry whose answer is an object that
    is gone is deleted (flushed with the caller's transaction) and missed; without `storage`
    such entries are missed and kept. A storage that is down raises (StorageUnavailable)."""
    if not keys:
        return {}
    now = now or utcnow()
    entries = session.scalars(
        select(CacheEntry).where(
            CacheEntry.owner == owner,
            CacheEntry.key.in_(sorted(set(keys))),
            CacheEntry.expires_at > now,
        )
    ).all()
    hits: dict[str, Hit] = {}
    for entry in entries:
        if entry.response_uri is None:
            hits[entry.key] = Hit(entry)
            continue
        if storage is None:
            continue
        try:
            hits[entry.key] = Hit(entry, storage.get_bytes(entry.response_uri))
        except KeyError:
            log.info("cache entry of job %s: its stored answer is gone; dropped", entry.job_id)
            session.execute(
                delete(CacheEntry).where(CacheEntry.owner == owner, CacheEntry.key == entry.key)
            )
    return hits


def insert_new_jobs(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert job rows, skipping those already there (a step taken up again); the ids of the
    rows this insert added."""
    if not rows:
        return set()
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    added = session.execute(
        dialect.insert(Job.__table__).on_conflict_do_nothing().returning(Job.__table__.c.id),
        rows,
    )
    return set(added.scalars())


def remember(
    session: Session,
    job: Job,
    *,
    response_text: str | None,
    response_uri: str | None,
    finish_reason: str,
    completion_tokens: int,
    logprobs: list[Any] | None,
    ttl_seconds: float = CACHE_TTL_SECONDS,
) -> None:
    """Store a succeeded job's answer under its key, in the caller's transaction. An entry
    already live under the key is kept (insert-or-ignore); an expired one is replaced."""
    if job.cache_key is None:
        return
    now = utcnow()
    session.execute(
        delete(CacheEntry).where(
            CacheEntry.owner == job.owner,
            CacheEntry.key == job.cache_key,
            CacheEntry.expires_at <= now,
        )
    )
    row = {
        "owner": job.owner,
        "key": job.cache_key,
        "model": job.model,
        "job_id": job.id,
        "created_at": now,
        "expires_at": now + timedelta(seconds=ttl_seconds),
        "response_text": response_text,
        "response_uri": response_uri,
        "finish_reason": finish_reason,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "logprobs": logprobs,
    }
    insert_ignoring_duplicates(session, CacheEntry.__table__, [row])
