"""Placing, recording and giving back the results of claimed jobs."""

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from jobs import queries
from jobs.outages import unavailable
from jobs.pricing import price
from jobs.queries import Claim, Outcome
from jobs.registry import ModelSpec
from jobs.service import publish
from jobs.storage import Storage, result_key, sample_result_key
from worker.claims import ClaimedRow
from worker.engine.decode import CANCELLED, Generation
from worker.services import Services

log = logging.getLogger(__name__)


def place_response(
    storage: Storage, job_id: str, text: str, inline_max_bytes: int, key: str | None = None
) -> tuple[str | None, str | None]:
    """Where a response is kept: `(text, None)` in the row, or `(None, key)` in object storage.

    Large responses go to storage (under `key`, the job's `result_key` by default), and so
    does any with a NUL character, which a model can emit (byte-fallback `<0x00>`) and
    Postgres text cannot hold.
    """
    if len(text.encode()) <= inline_max_bytes and "\x00" not in text:
        return text, None
    key = key or result_key(job_id)
    storage.put_bytes(key, text.encode())
    return None, key


class Results:
    """What becomes of a claimed job: its result recorded, its failure, or its claim given
    back to run again."""

    def __init__(self, services: Services, spec: ModelSpec) -> None:
        self.services = services
        self.spec = spec

    def record(self, row: ClaimedRow, generation: Generation) -> bool:
        """Record one result. A job whose result cannot be stored fails alone, at once; one
        whose database or storage is away for a moment is given back to run again, without
        spending an attempt."""
        if generation.finish_reason == CANCELLED:
            log.info("job %s was cancelled or reclaimed mid-decode; stopped", row.claim.job.id)
            return False
        try:
            with self.services.session_scope() as session:
                outcome = self._outcome(row, generation)
                ttl = self.services.settings.cache_ttl_seconds
                if queries.record_success(session, row.claim, outcome, ttl):
                    return True
                log.info("job %s was cancelled or reclaimed; result dropped", row.claim.job.id)
                return False
        except Exception as exc:
            if (down := unavailable(exc)) is not None:
                log.warning(
                    "job %s not recorded (%s is unavailable); given back", row.claim.job.id, down
                )
                self.return_for_outage([row.claim])
                return False
            if isinstance(exc, BotoCoreError | ClientError | OSError):
                # Refused by storage (access denied, say): tried again, within max_attempts.
                log.exception("could not store job %s's result; giving it back", row.claim.job.id)
                self.give_back([row.claim], repr(exc))
                return False
            log.exception("could not record the result of job %s", row.claim.job.id)
            self.fail([row.claim], "result_not_stored", f"the result could not be stored: {exc}")
            return False

    def fail(self, claims: list[Claim], code: str, message: str) -> None:
        """The jobs fail for good, with this error."""
        with self.services.session_scope() as session:
            for claim in claims:
                queries.record_failure(session, claim, code, message)

    def return_for_outage(self, claims: list[Claim]) -> None:
        """Give jobs back, at no cost to their attempts, to run once the outage is over. If
        the database is down too, their leases lapse and maintenance gives them back."""
        try:
            with self.services.session_scope() as session:
                queries.return_claims(session, claims, self.services.settings.outage_retry_seconds)
        except Exception:
            log.exception("could not give back %d jobs; their leases will lapse", len(claims))

    def give_back(self, claims: list[Claim], reason: str) -> None:
        """Give jobs back to run again, spending an attempt of each (within max_attempts)."""
        with self.services.session_scope() as session:
            requeued = queries.release_claims(
                session, claims, self.services.settings.max_attempts, reason
            )
            publish(session, self.services.queue, requeued)

    def _outcome(self, row: ClaimedRow, generation: Generation) -> Outcome:
        # EOS counts, as OpenAI and vLLM count (and bill) it: the model did generate it. Of n
        # samples, the prompt was prefilled once and counts once; every sample's tokens count.
        samples = generation.samples or [generation]
        completion_tokens = sum(sample.completion_tokens for sample in samples)
        cost = price(self.spec, len(row.prompt), completion_tokens)
        text, uri = place_response(
            self.services.storage,
            row.claim.job.id,
            generation.text,
            self.services.settings.result_inline_max_bytes,
        )
        return Outcome(
            completion_tokens=completion_tokens,
            finish_reason=generation.finish_reason,
            response_text=text,
            response_uri=uri,
            cost_input=cost.input,
            cost_output=cost.output,
            compute_seconds=sum(sample.compute_seconds for sample in samples),
            logprobs=generation.logprobs,
            choices=self._choices(row.claim.job.id, samples[1:]) if len(samples) > 1 else None,
        )

    def _choices(self, job_id: str, samples: list[Generation]) -> list[dict[str, Any]]:
        """Samples 1..n-1 as `Job.choices` holds them, large texts placed in storage."""
        choices = []
        for index, sample in enumerate(samples, start=1):
            text, uri = place_response(
                self.services.storage,
                job_id,
                sample.text,
                self.services.settings.result_inline_max_bytes,
                key=sample_result_key(job_id, index),
            )
            place = {"text": text} if uri is None else {"uri": uri}
            choices.append(
                {
                    **place,
                    "finish_reason": sample.finish_reason,
                    "completion_tokens": sample.completion_tokens,
                    "logprobs": sample.logprobs,
                }
            )
        return choices
