"""One settings object, read from `MBATCH_*` environment variables, shared by API and worker."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MBATCH_", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/mbatch"
    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "file://./.mbatch/storage"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    # The model a job gets when it names none.
    model: str = "mistral-7b-instruct-v0.2"
    models_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "mbatch" / "models")

    # API limits.
    max_request_bytes: int = 4 * 1024 * 1024
    # LoRA adapters, checked on upload.
    max_lora_rank: int = 32
    max_lora_bytes: int = 300 * 1000 * 1000
    # Adapters a worker keeps loaded, least recently used evicted first; a batch never holds
    # more distinct adapters than this.
    max_loras: int = 8

    # Batch input files (the OpenAI Batch API), refused above these.
    max_file_bytes: int = 200 * 1000 * 1000
    max_file_lines: int = 50_000
    # Overrides every batch's completion window (OpenAI's "24h"), e.g. to test expiry.
    batch_window_seconds: float | None = None
    # Lines validated and enqueued per transaction.
    batch_chunk_lines: int = 1000
    # A batch's step (validating, finalizing) that fails is tried again after
    # batch_step_retry_seconds, four times as long after each failure; after
    # batch_step_attempts tries the batch ends `failed` with the reason.
    batch_step_attempts: int = 5
    batch_step_retry_seconds: float = 60.0

    # Worker: batching and the claim on a job.
    max_batch_size: int = 32
    # Prompt plus max_tokens, summed over a batch: the most KV cache a batch can need.
    max_batch_tokens: int = 65536
    # The longest a worker waits for stragglers before it runs a batch that is not full; it
    # stops waiting sooner once no job has arrived for batch_quiet_ms.
    batch_wait_ms: int = 1000
    batch_quiet_ms: int = 100
    # A batch is chosen among this many times max_batch_size of the oldest queued jobs.
    claim_lookahead: int = 4
    # Split a claimed batch where padding would pass this multiple of the prompt tokens.
    max_padding: float = 2.0
    lease_seconds: int = 900
    max_attempts: int = 3
    # A queued job whose message has not been picked up for this long is published again
    # (covers a broker that lost its messages); Postgres decides whether it still runs.
    requeue_after_seconds: int = 600
    maintenance_interval_seconds: float = 30.0
    # A job whose result could not be recorded because storage or Postgres was down runs
    # again after this long (its attempts untouched), however long the outage lasts.
    outage_retry_seconds: float = 10.0
    # A broker message not acknowledged within this time is delivered again by Redis; it must
    # exceed the longest time a message can wait behind a batch.
    visibility_timeout_seconds: int = 6 * 3600

    # Results larger than this many UTF-8 bytes are kept in object storage, not in the row.
    result_inline_max_bytes: int = 64 * 1024
    device: str = "auto"
    dtype: str = "auto"


@lru_cache
def get_settings() -> Settings:
    return Settings()
