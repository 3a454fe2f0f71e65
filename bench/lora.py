"""Mixed-adapter batches against one-adapter batches of the same shapes, on the CPU.

Each batch is 32 rows with the same prompts (128 tokens) and max_tokens (64). In the mixed
batches the rows are spread over four distinct LoRA adapters plus base rows (`"__base__"`);
in the others every row uses one adapter. PEFT runs a batch as one pass of the base layers
plus one small pass per distinct adapter, so the ratio is what serving many adapters at once
costs. Adapters: rank 16 on all seven projections, on the benchmark's small random Mistral.

    python bench/lora.py [--batches 6]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import bench_model, report  # noqa: E402
from jobs.registry import resolve_model  # noqa: E402
from jobs.sampling import SamplingParams  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.adapters import make_adapter  # noqa: E402
from worker.engine.decode import generate  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402
from worker.engine.lora_cache import LoraCache, serving_config  # noqa: E402

ROWS, PROMPT_TOKENS, MAX_TOKENS, RANK = 32, 128, 64, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"adapter-{i}" for i in range(4)]


def run_batches(
    loaded: LoadedModel,
    prompts: list[list[int]],
    params: list[SamplingParams],
    adapters: Sequence[str | None],
    batches: int,
) -> tuple[int, float]:
    tokens, seconds = 0, 0.0
    for _ in range(batches):
        started = time.perf_counter()
        generations = generate(loaded, prompts, params, adapters)
        seconds += time.perf_counter() - started
        tokens += sum(len(g.token_ids) for g in generations)
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=6, help="batches of each kind")
    args = parser.parse_args()

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
                lambda f=folder: (f / "adapter_model.safetensors").read_bytes(),
            )

        rng = random.Random(0)
        prompts = [
            [1] + [rng.randint(100, 31999) for _ in range(PROMPT_TOKENS - 1)] for _ in range(ROWS)
        ]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0) for _ in range(ROWS)]
        kinds: dict[str, list[str | None]] = {
            "four adapters + base rows": [([*ADAPTERS, None])[i % 5] for i in range(ROWS)],
            "one adapter": [ADAPTERS[0]] * ROWS,
            "base model only": [None] * ROWS,
        }
        run_batches(loaded, prompts, params, kinds["one adapter"], 1)  # warm-up
        totals = {kind: (0, 0.0) for kind in kinds}
        # Interleaved, so that drift in the machine's speed falls on every kind alike.
        for _ in range(args.batches):
            for kind, adapters in kinds.items():
                tokens, seconds = run_batches(loaded, prompts, params, adapters, 1)
                done, spent = totals[kind]
                totals[kind] = (done + tokens, spent + seconds)
        rates = {kind: report(kind, *totals[kind]) for kind in kinds}

    ratio = rates["four adapters + base rows"] / rates["one adapter"]
    print(f"mixed / one adapter = {ratio:.2f} (aim: 0.7 or more)")
    print(
        json.dumps(
            {
                "mixed_tokens_per_s": round(rates["four adapters + base rows"], 1),
                "one_adapter_tokens_per_s": round(rates["one adapter"], 1),
                "base_tokens_per_s": round(rates["base model only"], 1),
                "mixed_over_one_adapter": round(ratio, 3),
                "rows": ROWS,
                "prompt_tokens": PROMPT_TOKENS,
                "max_tokens": MAX_TOKENS,
                "rank": RANK,
            }
        )
    )


if __name__ == "__main__":
    main()
