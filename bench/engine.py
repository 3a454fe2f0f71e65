"""The engine, refilled and static, against Hugging Face `generate` in naive static batches,
on the CPU.

The same 256 jobs go through all three. Refilled, the engine runs one batch of 32 slots and
gives each slot the oldest waiting job as soon as its row ends (`MBATCH_REFILL=true`, the
default). Static, it forms batches as a worker without refill does (the oldest job and its
nearest neighbours by prompt length, split where padding grows), lets finished rows leave,
and starts the next batch when the last row of this one ends. `generate` takes batches of the
same size in arrival order and runs each until its longest row is done. Useful tokens are
what each job asked for: up to its max_tokens or EOS.

It also counts the decode steps of the refilled and static runs and their mean rows per step.
On the CPU a step's cost grows with its rows, so rows leaving a static batch save most of
what their empty slots would cost; on a GPU a step costs nearly the same at any number of
rows, so the ratio of steps is what refill gains there.

    python bench/engine.py [--jobs 256]
"""

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import (  # noqa: E402
    BATCH_SIZE,
    JOBS,
    BenchJob,
    bench_model,
    make_workload,
    run_engine,
    run_engine_refilled,
    timed_run,
)
from jobs.registry import resolve_model  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402


@dataclass
class StepCount:
    steps: int = 0
    rows: int = 0

    def __call__(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self.rows += rows

    @property
    def mean_rows(self) -> float:
        return self.rows / max(self.steps, 1)


@torch.inference_mode()
def run_naive_generate(loaded: LoadedModel, jobs: list[BenchJob], eos_id: int) -> int:
    useful = 0
    for start in range(0, len(jobs), BATCH_SIZE):
        batch = jobs[start : start + BATCH_SIZE]
        width = max(len(job.prompt) for job in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            attention[row, width - len(job.prompt) :] = 1
        torch.manual_seed(start)
        output = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=max(job.params.max_tokens for job in batch),
            eos_token_id=eos_id,
            pad_token_id=0,
        )[:, width:]
        for row, job in enumerate(batch):
            tokens = output[row, : job.params.max_tokens].tolist()
            useful += tokens.index(eos_id) if eos_id in tokens else len(tokens)
    return useful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        settings = Settings(max_batch_size=BATCH_SIZE, models_dir=Path(root))
        loaded = load_model(resolve_model("tiny-random-mistral"), settings, bench_model(Path(root)))
        jobs = make_workload(args.jobs)
        print(f"{len(jobs)} jobs, batch size {BATCH_SIZE}, torch threads {torch.get_num_threads()}")

        refilled, static = StepCount(), StepCount()
        refill_rate = timed_run(
            "refilled", lambda: run_engine_refilled(loaded, jobs, settings, refilled)
        )
        engine_rate = timed_run("static  ", lambda: run_engine(loaded, jobs, settings, static))
        naive_rate = timed_run(
            "generate", lambda: run_naive_generate(loaded, jobs, loaded.tokenizer.eos_id)
        )
    ratio = refill_rate / naive_rate
    refill_ratio = refill_rate / engine_rate
    print(f"engine (refilled) / generate: {ratio:.2f}x")
    print(f"refilled / static: {refill_ratio:.2f}x")
    steps_ratio = static.steps / max(refilled.steps, 1)
    print(
        f"decode steps: refilled {refilled.steps} ({refilled.mean_rows:.1f} rows each), "
        f"static {static.steps} ({static.mean_rows:.1f} rows each): {steps_ratio:.2f}x fewer"
    )
    print(
        json.dumps(
            {
                "jobs": len(jobs),
                "engine_tokens_per_s": round(refill_rate, 1),
                "static_tokens_per_s": round(engine_rate, 1),
                "generate_tokens_per_s": round(naive_rate, 1),
                "ratio": round(ratio, 2),
                "refill_ratio": round(refill_ratio, 2),
                "refilled_steps": refilled.steps,
                "static_steps": static.steps,
                "refilled_rows_per_step": round(refilled.mean_rows, 1),
                "static_rows_per_step": round(static.mean_rows, 1),
                "steps_ratio": round(steps_ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
