"""The engine and Hugging Face `generate` on a GPU, against the memory-bandwidth limit.

Random weights in the real Mistral-7B-v0.2 shape, bf16; prompts of 512 tokens and 256 output
tokens at batch 1, 32 and 128. A decode step must read every weight and the batch's KV cache
once, so `batch x bandwidth / bytes per step` bounds output tokens/s; each figure is also
printed as a fraction of that bound. One command, a few minutes on an H100:

    python bench/gpu.py [--batches 1 32 128] [--bandwidth-gbs 3350]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.registry import resolve_model  # noqa: E402
from jobs.sampling import SamplingParams  # noqa: E402
from jobs.tokenizer import v1_tokenizer  # noqa: E402
from worker.engine.decode import generate  # noqa: E402
from worker.engine.loader import LoadedModel  # noqa: E402

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
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 256
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


def bound_tokens_per_s(model: MistralForCausalLM, batch: int, bandwidth_gbs: float) -> float:
    """Output tokens/s if every decode step only had to read the weights and the KV cache."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    mean_context = PROMPT_TOKENS + OUTPUT_TOKENS / 2
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    return batch * bandwidth_gbs * 1e9 / step_bytes


@torch.inference_mode()
def time_generate(model: MistralForCausalLM, prompts: torch.Tensor) -> tuple[int, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=OUTPUT_TOKENS,
        min_new_tokens=OUTPUT_TOKENS,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return (out.shape[1] - prompts.shape[1]) * prompts.shape[0], time.perf_counter() - started


def time_engine(loaded: LoadedModel, prompts: torch.Tensor) -> tuple[int, float]:
    rows = prompts.tolist()
    params = [SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0)] * len(rows)
    torch.cuda.synchronize()
    started = time.perf_counter()
    generations = generate(loaded, rows, params)
    torch.cuda.synchronize()
    return sum(len(g.token_ids) for g in generations), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    bandwidth = args.bandwidth_gbs or bandwidth_for(name)
    if bandwidth is None:
        sys.exit(f"unknown memory bandwidth for {name}: pass --bandwidth-gbs")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B_V02)).eval()
    torch.set_default_dtype(torch.float32)
    loaded = LoadedModel(
        resolve_model("mistral-7b-instruct-v0.2"), model, v1_tokenizer(), device, torch.bfloat16
    )
    print(
        f"{name}, {bandwidth:.0f} GB/s, torch {torch.__version__}, "
        f"prompt {PROMPT_TOKENS} + output {OUTPUT_TOKENS} tokens, bf16, random weights"
    )

    time_engine(loaded, torch.randint(100, 32000, (2, 32), device=device))  # warm-up
    time_generate(model, torch.randint(100, 32000, (2, 32), device=device))
    results = []
    print(
        f"{'batch':>5} {'engine tok/s':>13} {'of bound':>9} {'generate tok/s':>15} {'of bound':>9}"
    )
    for batch in args.batches:
        prompts = torch.randint(100, 32000, (batch, PROMPT_TOKENS), device=device)
        prompts[:, 0] = 1
        engine_tokens, engine_seconds = time_engine(loaded, prompts)
        hf_tokens, hf_seconds = time_generate(model, prompts)
        bound = bound_tokens_per_s(model, batch, bandwidth)
        engine_rate, hf_rate = engine_tokens / engine_seconds, hf_tokens / hf_seconds
        print(
            f"{batch:>5} {engine_rate:>13.0f} {engine_rate / bound:>9.2f} "
            f"{hf_rate:>15.0f} {hf_rate / bound:>9.2f}"
        )
        results.append(
            {
                "batch": batch,
                "engine_tokens_per_s": round(engine_rate, 1),
                "generate_tokens_per_s": round(hf_rate, 1),
                "bound_tokens_per_s": round(bound, 1),
            }
        )
        torch.cuda.empty_cache()
    print(json.dumps({"device": name, "results": results}))


if __name__ == "__main__":
    main()
