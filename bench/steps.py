"""aten ops and host syncs per decode step, counted with torch.profiler, on the CPU.

Three steady batches of 32 rows (prompts of 128 tokens, 48 tokens each): greedy, sampled
(temperature, top_p, top_k, a seed each) and greedy over 8 LoRA adapters plus base rows. Only
what runs inside the decode loop's steps is counted (the profiler range the loop names
`mbatch::decode_step`), nested ops included. Host syncs are the ops that read a value back
(`aten::_local_scalar_dense`, `aten::item`, `aten::nonzero`) plus the step's one read-back of
its new tokens, which no op names on the CPU.

    python bench/steps.py
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import bench_model  # noqa: E402
from jobs.registry import resolve_model  # noqa: E402
from jobs.sampling import SamplingParams  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.adapters import make_adapter  # noqa: E402
from worker.engine.decode import STEP_LABEL, generate  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402
from worker.engine.lora_cache import LoraCache, serving_config  # noqa: E402

ROWS, PROMPT_TOKENS, MAX_TOKENS, RANK = 32, 128, 48, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"adapter-{i}" for i in range(8)]
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")
READ_BACKS_PER_STEP = 1


def in_step(event: FunctionEvent) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == STEP_LABEL:
            return True
        parent = parent.cpu_parent
    return False


def count(
    loaded: LoadedModel, params: SamplingParams, adapters: list[str | None]
) -> dict[str, float]:
    rng = random.Random(0)
    prompts = [
        [1] + [rng.randint(100, 31999) for _ in range(PROMPT_TOKENS - 1)] for _ in range(ROWS)
    ]
    rows = [
        SamplingParams(**{**params.to_dict(), "seed": index, "stop": ()}) for index in range(ROWS)
    ]
    generate(loaded, prompts[:2], rows[:2], adapters[:2])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(loaded, prompts, rows, adapters)
    events = list(prof.events())
    steps = sum(event.name == STEP_LABEL for event in events)
    ops = [event for event in events if event.name.startswith("aten::") and in_step(event)]
    syncs = sum(event.name in SYNC_OPS for event in ops)
    return {
        "steps": steps,
        "ops_per_step": len(ops) / steps,
        "syncs_per_step": syncs / steps + READ_BACKS_PER_STEP,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(models_dir=root, device="cpu", dtype="float32")
        model_dir = bench_model(root)
        loaded = load_model(resolve_model("tiny-random-mistral"), settings, weights=model_dir)
        base: list[str | None] = [None] * ROWS
        greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, top_k=40)
        figures = {
            "greedy": count(loaded, greedy, base),
            "sampled": count(loaded, sampled, base),
        }
        cache = LoraCache(loaded, capacity=len(ADAPTERS))
        for seed, name in enumerate(ADAPTERS):
            folder = make_adapter(model_dir, root / name, rank=RANK, targets=TARGETS, seed=seed)
            data = (folder / "adapter_model.safetensors").read_bytes()
            config = serving_config(RANK, 2 * RANK, TARGETS)
            cache.ensure(name, config, lambda data=data: data)  # type: ignore[misc]
        mixed: list[str | None] = [
            None if index % 9 == 8 else ADAPTERS[index % 9] for index in range(ROWS)
        ]
        figures["lora8"] = count(loaded, greedy, mixed)
    for name, figure in figures.items():
        print(
            f"{name:8}: {figure['ops_per_step']:7.1f} aten ops, "
            f"{figure['syncs_per_step']:.2f} host syncs per step ({figure['steps']:.0f} steps)"
        )
    base_ops = figures["greedy"]["ops_per_step"]
    print(
        json.dumps(
            {
                "syncs_per_step": round(figures["sampled"]["syncs_per_step"], 2),
                "syncs_per_step_greedy": round(figures["greedy"]["syncs_per_step"], 2),
                "ops_per_step_base": round(base_ops, 1),
                "ops_per_step_sampled": round(figures["sampled"]["ops_per_step"], 1),
                "ops_per_step_lora8": round(figures["lora8"]["ops_per_step"], 1),
                "lora8_over_base": round(figures["lora8"]["ops_per_step"] / base_ops, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
