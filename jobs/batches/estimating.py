"""The estimate, a dry run of a batch: every line of an input file checked and its prompt
tokens counted exactly, nothing recorded and nothing run. The cost it gives runs from the
prompts alone to every line using all its `max_tokens`, with the first hundred refused lines.
Without a session (the command line's offline estimate) adapters are not looked up.
"""

from decimal import Decimal
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from jobs.batches.lines import InvalidLine, LineChecker, check_file, owner_adapters
from jobs.pricing import price
from jobs.schemas.batches import BatchEstimate
from jobs.settings import Settings


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
        sampling = result.prepared.sampling
        # Every sample may use all its max_tokens; the prompt is counted once.
        tokens, budget = result.prepared.prompt_tokens, sampling.max_tokens * sampling.n
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
