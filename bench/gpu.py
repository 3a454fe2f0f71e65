"""The engine and Hugging Face `generate` on a GPU, against the memory-bandwidth limit.

Random weights in the real Mistral-7B-v0.2 shape, bf16. Four tables, one command, a few
minutes on an H100:
- static: prompts of 512 tokens and 256 output tokens at batch 1, 32 and 128, the engine and
  `generate`, each also as a fraction of the bandwidth bound (a decode step must read every
  weight and the batch's KV cache once: `batch x bandwidth / bytes per step`);
- refill: 4 x the largest batch of jobs with mixed prompt (64 to 512) and output (16 to 256)
  lengths, refilled in that many slots against static batches of the same size, in useful
  tokens/s;
- lora: batch 32, rank-16 adapters on all seven projections: eight adapters plus base rows,
  one adapter, base only;
- awq: the first `--awq-layers` layers of the real shape quantized as AWQ (4-bit, group 128),
  loaded as the worker loads `mistral-7b-instruct-v0.1-awq`, against their float16 twin, at
  batch 1 and 32.

    python bench/gpu.py [--batches 1 32 128] [--bandwidth-gbs 3350] [--awq-layers 8]

`--smoke` runs the same code on the CPU in a tiny shape, to check the script, not to measure.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.registry import resolve_model  # noqa: E402
from jobs.sampling import SamplingParams  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.tokenizer import v1_tokenizer  # noqa: E402
from worker.engine.awq import DEQUANTIZED, make_tiny_awq_model  # noqa: E402
from worker.engine.decode import Generation, NewRow, decode_rows, generate  # noqa: E402
from worker.engine.loader import LoadedModel, load_model  # noqa: E402
from worker.engine.lora_batched import BASE  # noqa: E402
from worker.engine.lora_cache import LoraCache, serving_config  # noqa: E402

MISTRAL_7B_V02 = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# --smoke: the same code on the CPU, in a shape that runs in seconds.
SMOKE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 256
LORA_BATCH, LORA_RANK = 32, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"adapter-{i}" for i in range(8)]
AWQ_GROUP_SIZE = 128
# Peak memory bandwidth in GB/s, by a name fragment of the device.
BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "A10": 600,
    "L4": 300,
}


def bandwidth_for(name: str) -> float | None:
    for fragment, value in BANDWIDTH_GBS.items():
        if fragment in name:
            return float(value)
    return None


def bound_tokens_per_s(
    model: MistralForCausalLM, batch: int, bandwidth_gbs: float, prompt: int, output: int
) -> float:
    """Output tokens/s if every decode step only had to read the weights and the KV cache."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    mean_context = prompt + output / 2
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    return batch * bandwidth_gbs * 1e9 / step_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[[], int]) -> float:
    """Tokens/s of `run`, which returns the tokens it made."""
    synchronize(device)
    started = time.perf_counter()
    tokens = run()
    synchronize(device)
    return tokens / (time.perf_counter() - started)


@torch.inference_mode()
def generate_tokens(model: MistralForCausalLM, prompts: torch.Tensor, output: int) -> int:
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=output,
        min_new_tokens=output,
        pad_token_id=0,
    )
    return (out.shape[1] - prompts.shape[1]) * prompts.shape[0]  # type: ignore[no-any-return]


def engine_tokens(
    loaded: LoadedModel, prompts: list[list[int]], output: int, adapters: list[str] | None = None
) -> int:
    params = [SamplingParams(max_tokens=output, temperature=0)] * len(prompts)
    names = [None if name == BASE else name for name in adapters] if adapters else None
    return sum(len(g.token_ids) for g in generate(loaded, prompts, params, names))


def random_prompts(batch: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[1] + [rng.randint(100, 31999) for _ in range(length - 1)] for _ in range(batch)]


def static_table(
    loaded: LoadedModel, args: argparse.Namespace, bandwidth: float | None, shape: dict[str, int]
) -> list[dict[str, Any]]:
    rng = random.Random(0)
    model, device = loaded.model, loaded.device
    print(
        f"{'batch':>5} {'engine tok/s':>13} {'of bound':>9} {'generate tok/s':>15} {'of bound':>9}"
    )
    rows = []
    for batch in args.batches:
        prompts = random_prompts(batch, shape["prompt"], rng)
        engine = timed(device, lambda p=prompts: engine_tokens(loaded, p, shape["output"]))
        tensor = torch.tensor(prompts, device=device)
        hf = timed(device, lambda t=tensor: generate_tokens(model, t, shape["output"]))
        bound = (
            bound_tokens_per_s(model, batch, bandwidth, shape["prompt"], shape["output"])
            if bandwidth
            else float("nan")
        )
        print(f"{batch:>5} {engine:>13.0f} {engine / bound:>9.2f} {hf:>15.0f} {hf / bound:>9.2f}")
        rows.append(
            {
                "batch": batch,
                "engine_tokens_per_s": round(engine, 1),
                "generate_tokens_per_s": round(hf, 1),
                "bound_tokens_per_s": round(bound, 1) if bandwidth else None,
            }
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def refill_table(loaded: LoadedModel, slots: int, shape: dict[str, int]) -> dict[str, Any]:
    """Mixed lengths, refilled against static batches of the same jobs, in useful tokens/s."""
    rng = random.Random(1)
    jobs = [
        NewRow(
            index,
            random_prompts(1, rng.randint(shape["prompt"] // 8, shape["prompt"]), rng)[0],
            SamplingParams(max_tokens=rng.randint(shape["output"] // 16, shape["output"])),
        )
        for index in range(4 * slots)
    ]
    useful = 0

    def finished(key: object, generation: Generation) -> None:
        nonlocal useful
        useful += len(generation.token_ids)

    def refilled() -> int:
        decode_rows(loaded, jobs, finished, slots=slots)
        return useful

    def static() -> int:
        made = 0
        for start in range(0, len(jobs), slots):
            group = jobs[start : start + slots]
            prompts, params = [list(j.prompt) for j in group], [j.params for j in group]
            made += sum(len(g.token_ids) for g in generate(loaded, prompts, params))
        return made

    refill_rate = timed(loaded.device, refilled)
    static_rate = timed(loaded.device, static)
    print(
        f"refill, {len(jobs)} jobs in {slots} slots: refilled {refill_rate:.0f} useful tok/s, "
        f"static {static_rate:.0f}: {refill_rate / static_rate:.2f}x"
    )
    return {
        "slots": slots,
        "jobs": len(jobs),
        "refilled_tokens_per_s": round(refill_rate, 1),
        "static_tokens_per_s": round(static_rate, 1),
        "refill_ratio": round(refill_rate / static_rate, 3),
    }


def random_adapter(model: MistralForCausalLM, seed: int) -> bytes:
    """A rank-16 LoRA adapter on every projection, in PEFT's file format, with random weights:
    building one with PEFT would wrap the whole model."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            prefix = f"base_model.model.{name}"
            shape_a = (LORA_RANK, module.in_features)
            shape_b = (module.out_features, LORA_RANK)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(shape_a, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(shape_b, generator=generator) * 0.01
    return save(tensors)


def lora_table(loaded: LoadedModel, shape: dict[str, int]) -> dict[str, Any]:
    cache = LoraCache(loaded, capacity=len(ADAPTERS))
    config = serving_config(LORA_RANK, 2 * LORA_RANK, LORA_TARGETS)
    for seed, name in enumerate(ADAPTERS):
        data = random_adapter(loaded.model, seed)
        cache.ensure(name, config, lambda data=data: data)  # type: ignore[misc]
    prompts = random_prompts(LORA_BATCH, shape["prompt"], random.Random(2))
    kinds = {
        "eight adapters + base rows": [[*ADAPTERS, BASE][i % 9] for i in range(LORA_BATCH)],
        "one adapter": [ADAPTERS[0]] * LORA_BATCH,
        "base only": [BASE] * LORA_BATCH,
    }
    rates = {
        kind: timed(
            loaded.device, lambda n=names: engine_tokens(loaded, prompts, shape["output"], n)
        )
        for kind, names in kinds.items()
    }
    for kind, rate in rates.items():
        print(f"lora, batch {LORA_BATCH}, {kind}: {rate:.0f} tok/s")
    mixed8 = rates["eight adapters + base rows"] / rates["one adapter"]
    print(f"lora: eight adapters / one adapter = {mixed8:.2f}")
    return {
        "batch": LORA_BATCH,
        "mixed8_tokens_per_s": round(rates["eight adapters + base rows"], 1),
        "one_adapter_tokens_per_s": round(rates["one adapter"], 1),
        "base_tokens_per_s": round(rates["base only"], 1),
        "mixed8_over_one_adapter": round(mixed8, 3),
    }


def awq_table(
    device: torch.device, layers: int, shape: dict[str, int], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The AWQ model against its float16 twin: the first `layers` layers of the shape."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "awq"
        group = AWQ_GROUP_SIZE if overrides["hidden_size"] >= AWQ_GROUP_SIZE else 32
        make_tiny_awq_model(folder, 0, group, **{**overrides, "num_hidden_layers": layers})
        settings = Settings(models_dir=Path(root), device=device.type)
        awq = load_model(resolve_model("mistral-7b-instruct-v0.1-awq"), settings, folder)
        twin_settings = Settings(models_dir=Path(root), device=device.type, dtype="float16")
        twin = load_model(
            resolve_model("mistral-7b-instruct-v0.1"), twin_settings, folder / DEQUANTIZED
        )
        rng = random.Random(3)
        result: dict[str, Any] = {"layers": layers, "group_size": group}
        for batch in (1, LORA_BATCH):
            prompts = random_prompts(batch, shape["prompt"], rng)
            awq_rate = timed(device, lambda p=prompts: engine_tokens(awq, p, shape["output"]))
            twin_rate = timed(device, lambda p=prompts: engine_tokens(twin, p, shape["output"]))
            print(
                f"awq, {layers} layers, batch {batch}: {awq_rate:.0f} tok/s, "
                f"float16 twin {twin_rate:.0f}: {awq_rate / twin_rate:.2f}x"
            )
            result[f"batch{batch}"] = {
                "awq_tokens_per_s": round(awq_rate, 1),
                "float16_tokens_per_s": round(twin_rate, 1),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--awq-layers", type=int, default=8)
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["static", "refill", "lora", "awq"],
        choices=["static", "refill", "lora", "awq"],
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    overrides = {**MISTRAL_7B_V02, **(SMOKE_SHAPE if args.smoke else {})}
    shape = (
        {"prompt": 32, "output": 16}
        if args.smoke
        else {"prompt": PROMPT_TOKENS, "output": OUTPUT_TOKENS}
    )
    if args.smoke:
        device, name, bandwidth, dtype = torch.device("cpu"), "cpu (smoke)", None, torch.float32
        args.batches = [1, 4]
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (--smoke checks it on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name(device)
        bandwidth = args.bandwidth_gbs or bandwidth_for(name)
        if bandwidth is None:
            sys.exit(f"unknown memory bandwidth for {name}: pass --bandwidth-gbs")
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = MistralForCausalLM(MistralConfig(**overrides)).eval()
    torch.set_default_dtype(torch.float32)
    loaded = LoadedModel(
        resolve_model("mistral-7b-instruct-v0.2"), model, v1_tokenizer(), device, dtype
    )
    print(
        f"{name}, {bandwidth or 0:.0f} GB/s, torch {torch.__version__}, prompt {shape['prompt']} "
        f"+ output {shape['output']} tokens, {dtype}, random weights"
    )
    warm = random_prompts(2, 32, random.Random(9))
    engine_tokens(loaded, warm, 4)
    generate_tokens(model, torch.tensor(warm, device=device), 4)
    results: dict[str, Any] = {"device": name}
    if "static" in args.tables:
        results["static"] = static_table(loaded, args, bandwidth, shape)
    if "refill" in args.tables:
        results["refill"] = refill_table(loaded, max(args.batches), shape)
    if "lora" in args.tables:
        results["lora"] = lora_table(loaded, shape)
    if "awq" in args.tables:
        del loaded, model  # the AWQ models need the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["awq"] = awq_table(device, args.awq_layers, shape, overrides)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
