"""The fixed workload the CPU benchmarks share: 256 jobs of mixed prompt and output lengths."""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.sampling import SamplingParams
from jobs.settings import Settings
from worker.engine.batching import plan_groups, select_batch
from worker.engine.decode import Generation, NewRow, OnStep, decode_rows, generate
from worker.engine.loader import LoadedModel
from worker.engine.tiny import make_tiny_model

# A small random Mistral: wider than the test model, so that the work per token, not Python,
# decides the figures, and still quick on two CPU cores.
BENCH_MODEL_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
}
JOBS = 256
BATCH_SIZE = 32


@dataclass(frozen=True)
class BenchJob:
    prompt: list[int]
    params: SamplingParams


def make_workload(jobs: int = JOBS, seed: int = 0) -> list[BenchJob]:
    """Prompts of 10 to 500 tokens and max_tokens of 16 to 256, in arrival order; one job in
    four greedy, the others sampled with their own seed."""
    rng = random.Random(seed)
    workload = []
    for index in range(jobs):
        prompt = [1] + [rng.randint(100, 31999) for _ in range(rng.randint(9, 499))]
        greedy = index % 4 == 0
        params = SamplingParams(
            max_tokens=rng.randint(16, 256),
            temperature=0 if greedy else 0.8,
            top_p=1.0 if greedy else 0.95,
            seed=None if greedy else index + 1,
        )
        workload.append(BenchJob(prompt, params))
    return workload


def bench_model(root: Path) -> Path:
    directory = root / "bench-random-mistral"
    if not (directory / "config.json").exists():
        make_tiny_model(directory, seed=1, **BENCH_MODEL_CONFIG)
    return directory


def run_engine(
    loaded: LoadedModel, jobs: list[BenchJob], settings: Settings, on_step: OnStep | None = None
) -> int:
    """Useful tokens of the jobs run as a worker runs them: batches chosen from a window of the
    oldest, split by prompt length."""
    queue = list(jobs)
    useful = 0
    while queue:
        window = queue[: settings.max_batch_size * settings.claim_lookahead]
        batch = select_batch(
            window,
            prompt_tokens=lambda job: len(job.prompt),
            max_tokens=lambda job: job.params.max_tokens,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
        )
        chosen = {id(job) for job in batch}
        queue = [job for job in queue if id(job) not in chosen]
        for group in plan_groups(batch, lambda job: len(job.prompt), settings.max_padding):
            generations = generate(
                loaded,
                [job.prompt for job in group],
                [job.params for job in group],
                on_step=on_step,
            )
            useful += sum(len(g.token_ids) for g in generations)
    return useful


def run_engine_refilled(
    loaded: LoadedModel, jobs: list[BenchJob], settings: Settings, on_step: OnStep | None = None
) -> int:
    """Useful tokens of the jobs run as a refilling worker runs them: one batch of
    max_batch_size slots, each slot taking the oldest waiting job as soon as its row ends."""
    useful = 0

    def finished(key: object, generation: Generation) -> None:
        nonlocal useful
        useful += len(generation.token_ids)

    rows = [NewRow(index, job.prompt, job.params) for index, job in enumerate(jobs)]
    decode_rows(loaded, rows, finished, slots=settings.max_batch_size, on_step=on_step)
    return useful


def timed_run(label: str, run: Callable[[], int]) -> float:
    """Time `run` (which returns useful tokens), print one line; returns useful tokens/s."""
    started = time.perf_counter()
    tokens = run()
    return report(label, tokens, time.perf_counter() - started)


def report(label: str, tokens: int, seconds: float) -> float:
    """Print one measured line; returns useful tokens/s."""
    rate = tokens / seconds
    print(f"{label}: {tokens} useful tokens in {seconds:.1f} s = {rate:.1f} tokens/s")
    return rate
