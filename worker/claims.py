"""The jobs a worker has claimed: as the rows the engine decodes, and as the batch running now,
which the timer threads renew and watch while the decode loop runs it."""

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from jobs.queries import Claim
from jobs.sampling import SamplingParams
from jobs.tokenizer import MistralTokenizer, encode_job_input


@dataclass(frozen=True)
class ClaimedRow:
    claim: Claim
    prompt: list[int]
    params: SamplingParams

    @property
    def adapter(self) -> str | None:
        return self.claim.job.lora_id


def prepare_rows(
    claims: list[Claim],
    tokenizer: MistralTokenizer,
    fail: Callable[[list[Claim], str, str], None],
) -> list[ClaimedRow]:
    """The claims as rows; a bad stored job fails alone (through `fail`), its batch mates run."""
    rows = []
    for claim in claims:
        try:
            prompt = encode_job_input(tokenizer, claim.job.input)
            params = SamplingParams.from_dict(claim.job.sampling)
        except Exception as exc:
            fail([claim], "invalid_job", str(exc))
            continue
        rows.append(ClaimedRow(claim, prompt, params))
    return rows


class RunningClaims:
    """The claims of the batch being decoded, and which of them were lost meanwhile
    (cancelled, or taken from us): those are not decoded further."""

    def __init__(self) -> None:
        self._running: list[Claim] = []
        self._lost: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def start(self, claims: list[Claim]) -> None:
        with self._lock:
            self._running = list(claims)

    def clear(self) -> None:
        with self._lock:
            self._running, self._lost = [], frozenset()

    def snapshot(self) -> list[Claim]:
        with self._lock:
            return list(self._running)

    def mark_lost(self, running: list[Claim], lost: Iterable[str]) -> None:
        """Note the lost job ids found among `running`, unless another batch runs by now."""
        with self._lock:
            if self._running and self._running[0] is running[0]:
                self._lost = frozenset(lost)

    def dropped_keys(self, rows: Mapping[int, ClaimedRow]) -> set[int]:
        """The keys of the decoding `rows` whose jobs were lost: the decode loop drops them."""
        lost = self._lost
        if not lost:
            return set()
        return {key for key, row in rows.items() if row.claim.job.id in lost}

    def dropped(self, group: Sequence[ClaimedRow]) -> list[int]:
        """The indices of the group's rows whose jobs were lost: the decode loop drops them."""
        lost = self._lost
        if not lost:
            return []
        return [index for index, row in enumerate(group) if row.claim.job.id in lost]
