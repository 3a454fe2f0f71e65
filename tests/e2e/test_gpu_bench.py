"""bench/gpu.py runs only where a GPU is lent; its --smoke mode runs the same code on the CPU,
so that the script is known to work before a GPU's time is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_every_table_in_its_smoke_mode() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["batch"] for row in figures["static"]] == [1, 4]
    assert all(row["engine_tokens_per_s"] > 0 for row in figures["static"])
    assert figures["refill"]["refill_ratio"] > 0
    assert figures["lora"]["mixed8_over_one_adapter"] > 0
    assert figures["awq"]["batch32"]["awq_tokens_per_s"] > 0
