"""Mixed-adapter batches against one-adapter batches of the same shapes, on the CPU.

Each batch is 32 rows with the same prompts (128 tokens), decoded greedily for 64 tokens
(every row runs to the end, so each batch makes the same tokens). The mixed batches spread
their rows over eight (or four) distinct LoRA adapters plus base rows (`"__base__"`); the others
put every row on one adapter, or on none. Adapters: rank 16 on all seven projections, on the
benchmark's small random Mistral.

The batches run through a small decode loop of this file (prefill, then one token per step
with a `DynamicCache`), so that the forward pass is all that differs between the kinds:
- the batched forward (`worker.engine.lora_batched`): one gathered LoRA pass per projection,
  with the rows' adapter slots computed once per batch, as a decode loop keeps them;
- PEFT's mixed-batch forward (`loaded.peft(..., adapter_names=...)`), the engine's path until
  now: one pass per distinct adapter per projection, hooks registered on every call.

It also counts, with torch.profiler, the aten ops of one steady decode step of a base-only
batch and of an eight-adapter batch.

    python bench/lora.py [--batches 5] [--peft-batches 1] [--threads N]
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import bench_model, report  # noqa: E402
from jobs.registry import resolve_model  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.adapters import make_adapter  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402
from worker.engine.lora_batched import BASE, forward_indexed, row_indices  # noqa: E402
from worker.engine.lora_cache import LoraCache, serving_config  # noqa: E402

ROWS, PROMPT_TOKENS, MAX_TOKENS, RANK = 32, 128, 64, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"adapter-{i}" for i in range(8)]
PROFILED_STEPS = 4

# A forward pass of the model for rows named by adapter (BASE for none).
Forward = Callable[..., Any]


def batched(loaded: LoadedModel, names: Sequence[str]) -> Forward:
    """The batched forward, with the rows' slots looked up once, as a decode loop keeps them."""
    indices = None if all(name == BASE for name in names) else row_indices(loaded, names)
    return lambda **inputs: forward_indexed(loaded, indices, **inputs)


def through_peft(loaded: LoadedModel, names: Sequence[str]) -> Forward:
    assert loaded.peft is not None
    peft, rows = loaded.peft, list(names)
    return lambda **inputs: peft(**inputs, adapter_names=rows)


def step(forward: Forward, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One greedy forward: the next token of every row."""
    out = forward(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)  # type: ignore[no-any-return]


@torch.inference_mode()
def decode(forward: Forward, prompts: torch.Tensor, steps: int) -> int:
    """Greedy decode of every row for `steps` tokens (the prefill makes the first); returns
    the tokens made."""
    cache = DynamicCache()
    tokens = step(forward, prompts, cache)
    for _ in range(steps - 1):
        tokens = step(forward, tokens, cache)
    return prompts.shape[0] * steps


@torch.inference_mode()
def ops_per_step(forward: Forward, prompts: torch.Tensor) -> float:
    """aten ops (every recorded `aten::` call, nested ones included) per steady decode step."""
    cache = DynamicCache()
    tokens = step(forward, step(forward, prompts, cache), cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            tokens = step(forward, tokens, cache)
    ops = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
    return ops / PROFILED_STEPS


def median_rate(label: str, batches: list[tuple[int, float]]) -> float:
    """Print the batches' total and median; returns the median tokens/s."""
    report(f"{label} (total)", sum(t for t, _ in batches), sum(s for _, s in batches))
    rate = statistics.median(tokens / seconds for tokens, seconds in batches)
    print(f"{label}: median {rate:.1f} tokens/s over {len(batches)} batches")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=5, help="batches of each kind")
    parser.add_argument(
        "--peft-batches", type=int, default=1, help="batches of each kind through PEFT"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        # One thread is far steadier than two on a machine other work shares.
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(models_dir=root, device="cpu", dtype="float32")
        model_dir = bench_model(root)
        loaded = load_model(resolve_model("tiny-random-mistral"), settings, weights=model_dir)
        cache = LoraCache(loaded, capacity=len(ADAPTERS))
        for seed, name in enumerate(ADAPTERS):
            folder = make_adapter(model_dir, root / name, rank=RANK, targets=TARGETS, seed=seed)
            cache.ensure(
                name,
                serving_config(RANK, 2 * RANK, TARGETS),
                (folder / "adapter_model.safetensors").read_bytes,
            )

        rng = random.Random(0)
        prompts = torch.tensor(
            [[1] + [rng.randint(100, 31999) for _ in range(PROMPT_TOKENS - 1)] for _ in range(ROWS)]
        )
        kinds: dict[str, list[str]] = {
            "eight adapters + base rows": [[*ADAPTERS, BASE][i % 9] for i in range(ROWS)],
            "four adapters + base rows": [[*ADAPTERS[:4], BASE][i % 5] for i in range(ROWS)],
            "one adapter": [ADAPTERS[0]] * ROWS,
            "base model only": [BASE] * ROWS,
        }
        paths = {"batched": (batched, args.batches), "PEFT": (through_peft, args.peft_batches)}
        decode(batched(loaded, kinds["one adapter"]), prompts, 4)  # warm-up
        runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
        # Interleaved batch by batch, so that drift in the machine's speed falls on every kind
        # alike; each kind's rate is the median of its batches', which other work on the
        # machine moves less than a total would.
        for round_ in range(max(count for _, count in paths.values())):
            for path, (make, count) in paths.items():
                if round_ >= count:
                    continue
                for kind, names in kinds.items():
                    started = time.perf_counter()
                    tokens = decode(make(loaded, names), prompts, MAX_TOKENS)
                    elapsed = time.perf_counter() - started
                    runs.setdefault((path, kind), []).append((tokens, elapsed))
        rates = {key: median_rate(f"{key[0]}: {key[1]}", batches) for key, batches in runs.items()}

        ops = {
            "base": ops_per_step(batched(loaded, kinds["base model only"]), prompts),
            "lora8": ops_per_step(batched(loaded, kinds["eight adapters + base rows"]), prompts),
            "peft_lora8": ops_per_step(
                through_peft(loaded, kinds["eight adapters + base rows"]), prompts
            ),
        }

    one = rates["batched", "one adapter"]
    mixed8 = rates["batched", "eight adapters + base rows"] / one
    mixed4 = rates["batched", "four adapters + base rows"] / one
    peft = ("PEFT", "eight adapters + base rows") in rates
    peft_mixed8 = (
        rates["PEFT", "eight adapters + base rows"] / rates["PEFT", "one adapter"] if peft else None
    )
    print(f"batched: eight adapters / one adapter = {mixed8:.2f} (aim: 0.9 or more)")
    print(f"batched: four adapters / one adapter = {mixed4:.2f}")
    if peft_mixed8 is not None:
        print(f"PEFT: eight adapters / one adapter = {peft_mixed8:.2f}")
    print(
        f"aten ops per decode step: base-only {ops['base']:.0f}, eight adapters "
        f"{ops['lora8']:.0f} ({ops['lora8'] / ops['base']:.2f}x, aim: 1.5x or less); "
        f"through PEFT {ops['peft_lora8']:.0f} ({ops['peft_lora8'] / ops['base']:.2f}x)"
    )
    print(
        json.dumps(
            {
                "mixed8_tokens_per_s": round(rates["batched", "eight adapters + base rows"], 1),
                "mixed_tokens_per_s": round(rates["batched", "four adapters + base rows"], 1),
                "one_adapter_tokens_per_s": round(one, 1),
                "base_tokens_per_s": round(rates["batched", "base model only"], 1),
                "mixed8_over_one_adapter": round(mixed8, 3),
                "mixed_over_one_adapter": round(mixed4, 3),
                "peft_mixed8_over_one_adapter": round(peft_mixed8, 3) if peft_mixed8 else None,
                "ops_per_step_base": round(ops["base"], 1),
                "ops_per_step_lora8": round(ops["lora8"], 1),
                "ops_per_step_peft_lora8": round(ops["peft_lora8"], 1),
                "rows": ROWS,
                "prompt_tokens": PROMPT_TOKENS,
                "max_tokens": MAX_TOKENS,
                "rank": RANK,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
