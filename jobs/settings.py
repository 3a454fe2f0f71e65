"""One settings object, read from `MBATCH_*` environment variables, shared by API and worker.

Settings are checked when they are read, each alone and against each other, so that a bad one
stops a process at start-up; `error_lines` says what is wrong in one line per setting.
"""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MBATCH_"
# How long an answer stays in the result cache unless `cache_ttl_seconds` says otherwise.
CACHE_TTL_SECONDS = 7 * 24 * 3600.0

# Counts and sizes where 0 would stop the work; amounts and times where a negative one means
# nothing; times that must pass (a loop sleeping 0 s would spin).
AtLeastOne = Annotated[int, Field(ge=1)]
NotNegative = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class SettingError(ValueError):
    """A setting that does not fit with the others, said as `MBATCH_X=value: reason`."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/mbatch"
    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "file://./.mbatch/storage"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    # The model a job gets when it names none.
    model: str = "mistral-7b-instruct-v0.2"
    models_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "mbatch" / "models")

    # API limits.
    max_request_bytes: AtLeastOne = 4 * 1024 * 1024
    # LoRA adapters, checked on upload.
    max_lora_rank: AtLeastOne = 32
    max_lora_bytes: AtLeastOne = 300 * 1000 * 1000
    # Adapters a worker keeps loaded, least recently used evicted first; a batch never holds
    # more distinct adapters than this.
    max_loras: AtLeastOne = 8

    # Batch input files (the OpenAI Batch API), refused above these.
    max_file_bytes: AtLeastOne = 200 * 1000 * 1000
    max_file_lines: AtLeastOne = 50_000
    # Overrides every batch's completion window (OpenAI's "24h"), e.g. to test expiry.
    batch_window_seconds: PositiveSeconds | None = None
    # Lines validated and enqueued per transaction.
    batch_chunk_lines: AtLeastOne = 1000
    # A batch's step (validating, finalizing) that fails is tried again after
    # batch_step_retry_seconds, four times as long after each failure; after
    # batch_step_attempts tries the batch ends `failed` with the reason.
    batch_step_attempts: AtLeastOne = 5
    batch_step_retry_seconds: Seconds = 60.0

    # Worker: batching and the claim on a job.
    max_batch_size: AtLeastOne = 32
    # Prompt plus max_tokens, summed over a batch: the most KV cache a batch can need.
    max_batch_tokens: AtLeastOne = 65536
    # The longest a worker waits for stragglers before it runs a batch that is not full; it
    # stops waiting sooner once no job has arrived for batch_quiet_ms.
    batch_wait_ms: NotNegative = 1000
    batch_quiet_ms: NotNegative = 100
    # A batch is chosen among this many times max_batch_size of the queued jobs (each lane's
    # owners' oldest, `jobs.queries.queued_candidates`).
    claim_lookahead: AtLeastOne = 4
    # Lanes (interactive, native jobs, file-batch lines) fill a batch in that order, but each
    # keeps at least this fraction of max_batch_size while it has work, so that none starves.
    lane_min_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    # Slots of a refilled batch that native jobs and file-batch lines never fill, so that an
    # interactive job finds one free at once (at most half of max_batch_size are kept).
    interactive_slots: NotNegative = 2
    # Within a lane, owners take turns by the tokens they were given; a claim looks at this
    # many owners of each lane, the next claim starting after the last one it looked at.
    claim_owners: AtLeastOne = 16
    # Split a claimed batch where padding would pass this multiple of the prompt tokens.
    max_padding: Annotated[float, Field(ge=0)] = 2.0
    lease_seconds: AtLeastOne = 900
    max_attempts: AtLeastOne = 3
    # A queued job whose message has not been picked up for this long is published again
    # (covers a broker that lost its messages); Postgres decides whether it still runs.
    requeue_after_seconds: NotNegative = 600
    maintenance_interval_seconds: PositiveSeconds = 30.0
    # Finished jobs, and finished batches with their files, are deleted (their stored objects
    # with them) this many days after they ended, as OpenAI keeps batch files 30 days.
    retention_days: AtLeastOne = 30
    # Answers kept for `"cache": true` requests stay this long, then are ignored and removed.
    cache_ttl_seconds: PositiveSeconds = CACHE_TTL_SECONDS
    # A job whose result could not be recorded because storage or Postgres was down runs
    # again after this long (its attempts untouched), however long the outage lasts.
    outage_retry_seconds: Seconds = 10.0
    # A broker message not acknowledged within this time is delivered again by Redis; it must
    # exceed the time a message is held, at least lease_seconds plus batch_wait_ms (a batch
    # renews its lease, so a long one holds its message longer: set it well above).
    visibility_timeout_seconds: AtLeastOne = 6 * 3600

    # Webhooks: the retry schedule (0 s, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h) is
    # multiplied by webhook_retry_scale (tests shrink it); webhook_concurrency deliveries run
    # at once in `mbatch webhooks`. Callback URLs that resolve to loopback, private,
    # link-local or reserved addresses are refused unless webhook_allow_private (development
    # and tests only).
    webhook_retry_scale: Annotated[float, Field(ge=0)] = 1.0
    webhook_concurrency: AtLeastOne = 16
    webhook_allow_private: bool = False
    # Schedules: the shortest interval between two fires a cron expression may ask for.
    schedule_min_interval_seconds: PositiveSeconds = 60.0

    # Results larger than this many UTF-8 bytes are kept in object storage, not in the row.
    result_inline_max_bytes: NotNegative = 64 * 1024
    device: str = "auto"
    dtype: str = "auto"
    # A running batch claims more queued jobs of its model as its rows finish, so that its
    # slots stay full; false runs each claimed batch to its end first (for comparison).
    refill: bool = True
    # Rows refilled together join a running batch a prefill of about this many prompt tokens
    # at a time, with a decode step between two: its rows (and a caller waiting for a first
    # token) never wait for one long prefill of a whole wave.
    prefill_chunk_tokens: AtLeastOne = 512
    # The decode step runs under torch.compile (CUDA graphs on a GPU).
    compile: bool = False

    # Sync and streaming answers (`/ai/run`, `/v1/chat/completions`, `stream: true`): how
    # long the API waits for a job before it answers 504 with the job's id, to poll instead.
    sync_timeout_seconds: PositiveSeconds = 300.0
    # How long a job's stream of text stays in Redis after its last event.
    stream_ttl_seconds: PositiveSeconds = 600.0

    @field_validator("storage_url")
    @classmethod
    def _usable_storage_url(cls, value: str) -> str:
        url = urlparse(value)
        if (url.scheme == "s3" and url.netloc) or (url.scheme == "file" and url.netloc + url.path):
            return value
        raise ValueError("must be s3://bucket[/prefix] or file://path")

    @model_validator(mode="after")
    def _fit_together(self) -> "Settings":
        # Redis delivers a message again once it has gone unacknowledged for the visibility
        # timeout. A message is acknowledged after its batch: the straggler wait, then a run
        # under a lease (renewed, so a long batch holds it longer still: this is the least).
        # Held longer than the timeout, it would be delivered to a second worker while the
        # first still runs it (Postgres refuses the second claim, but the work of waking for
        # it is wasted). A message waiting in the queue is not held (one is fetched at a
        # time), so requeue_after_seconds does not enter into it.
        held = self.lease_seconds + self.batch_wait_ms / 1000
        if self.visibility_timeout_seconds <= held:
            raise SettingError(
                f"{env_name('visibility_timeout_seconds')}={self.visibility_timeout_seconds}: "
                f"must be more than {env_name('lease_seconds')} plus "
                f"{env_name('batch_wait_ms')} ({held:g} s), the least time a message is held"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def error_lines(exc: ValidationError) -> list[str]:
    """One line per bad setting, naming its environment variable: `MBATCH_X=value: reason`."""
    lines = []
    for error in exc.errors(include_url=False):
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, SettingError):
            lines.append(str(cause))
            continue
        name = env_name(str(error["loc"][0])) if error["loc"] else ENV_PREFIX + "*"
        lines.append(f"{name}={error['input']}: {_reason(error)}")
    return lines


def _reason(error: Any) -> str:
    ctx = error.get("ctx", {})
    if error["type"] == "greater_than_equal":
        return f"must be at least {ctx['ge']:g}"
    if error["type"] == "greater_than":
        return f"must be more than {ctx['gt']:g}"
    if error["type"] == "less_than_equal":
        return f"must be at most {ctx['le']:g}"
    if error["type"] == "value_error":
        return str(ctx["error"])
    return str(error["msg"])
