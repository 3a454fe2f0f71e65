"""What a decode step costs with 32 rows held to JSON Schemas, against 32 free rows, on the CPU.

Both runs decode the same prompts with the same sampling (temperature 1, a seed per row) on
the bench model, 32 slots refilled from a queue so that every timed step has 32 rows. Each
constrained row has one of 32 random schemas (those of tests/unit/test_structured_output.py);
each free row then takes as many tokens as it took constrained, so that both runs have the
same rows of the same lengths in their steps and differ by the grammar alone.
Step times are the decode loop's own (`on_step`), over the steps with every slot full, after
a warm-up; the mask's share (filling the rows' bitmasks and applying them) is timed apart.

    python bench/constrained.py [--rows 256]
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import worker.engine.decode as decode  # noqa: E402
from bench.workload import bench_model  # noqa: E402
from jobs.registry import resolve_model  # noqa: E402
from jobs.response_format import schema_text  # noqa: E402
from jobs.sampling import SamplingParams  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.unit.test_structured_output import random_schemas  # noqa: E402
from worker.engine.decode import Generation, NewRow, decode_rows  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402

SLOTS, PROMPT_TOKENS, MAX_TOKENS = 32, 64, 64


class Timed:
    """The decode loop's mask function, timed call by call."""

    def __init__(self, mask: Any) -> None:
        self.mask = mask
        self.seconds: list[float] = []

    def __call__(self, *args: Any) -> Any:
        started = time.perf_counter()
        result = self.mask(*args)
        self.seconds.append(time.perf_counter() - started)
        return result


def rows_of(count: int, schemas: list[str | None], lengths: list[int] | None) -> list[NewRow]:
    """`count` rows of random prompts, seeded, each with a schema (None: free) and, where
    given, its own max_tokens."""
    rng = random.Random(0)
    return [
        NewRow(
            index,
            [1] + [rng.randint(100, 31999) for _ in range(PROMPT_TOKENS - 1)],
            SamplingParams(
                max_tokens=lengths[index] if lengths else MAX_TOKENS,
                temperature=1.0,
                seed=index + 1,
                response_format=schemas[index % len(schemas)],
            ),
        )
        for index in range(count)
    ]


def run(loaded: LoadedModel, rows: list[NewRow]) -> tuple[dict[str, float], list[int]]:
    """The run's figures, and how many tokens each row took (EOS included)."""
    queue = list(rows)
    steps: list[float] = []
    results: dict[Hashable, Generation] = {}

    def refill(free: int) -> list[NewRow]:
        taken, queue[:] = queue[:free], queue[free:]
        return taken

    def on_step(rows_in_step: int, seconds: float) -> None:
        if rows_in_step == SLOTS:
            steps.append(seconds)

    timed = Timed(decode.mask_logits)
    decode.mask_logits = timed  # type: ignore[assignment]
    try:
        decode_rows(loaded, [], results.__setitem__, slots=SLOTS, refill=refill, on_step=on_step)
    finally:
        decode.mask_logits = timed.mask
    timed_steps = steps[5:] or [0.0]  # past the first steps' warm-up
    figures = {
        "step_ms": statistics.median(timed_steps) * 1000,
        "mask_ms": statistics.median(timed.seconds) * 1000 if timed.seconds else 0.0,
        "steps": len(timed_steps),
        "stopped": sum(result.finish_reason == "stop" for result in results.values()),
    }
    return figures, [results[row.key].completion_tokens for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per run, 32 at a time")
    args = parser.parse_args()
    torch.manual_seed(0)
    schemas: list[str | None] = [
        schema_text({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        for schema in random_schemas(SLOTS, seed=1)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(models_dir=root, device="cpu", dtype="float32")
        loaded = load_model(resolve_model("tiny-random-mistral"), settings, bench_model(root))
        run(loaded, rows_of(SLOTS, schemas, None))  # warm-up: the grammar tokenizer, compiles
        constrained, lengths = run(loaded, rows_of(args.rows, schemas, None))
        # The same rows free, each as long as it was constrained: the same steps, unmasked.
        free, _ = run(loaded, rows_of(args.rows, [None], lengths))
    for name, figure in (("free", free), ("constrained", constrained)):
        print(
            f"{name:11}: {figure['step_ms']:6.2f} ms per step of {SLOTS} rows "
            f"(mask {figure['mask_ms']:.2f} ms; {figure['steps']:.0f} full steps, "
            f"{figure['stopped']:.0f} of {args.rows} rows ended stop)"
        )
    print(
        json.dumps(
            {
                "constrained_over_free": round(constrained["step_ms"] / free["step_ms"], 2),
                "free_step_ms": round(free["step_ms"], 2),
                "constrained_step_ms": round(constrained["step_ms"], 2),
                "mask_ms": round(constrained["mask_ms"], 2),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
