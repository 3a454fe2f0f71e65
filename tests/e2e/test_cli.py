"""The command line as a user runs it."""

import json
import os
import subprocess
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import services
from tests.conftest import Stack, create_key

EXAMPLES = Path(__file__).parents[2] / "examples" / "prompts.jsonl"


def test_make_tiny_model_writes_a_folder_from_pretrained_loads(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    subprocess.run(services.mbatch("make-tiny-model", str(target)), check=True)
    model = AutoModelForCausalLM.from_pretrained(target)
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.num_parameters() < 10_000_000
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert len(tokenizer) == 32000
    assert tokenizer("[INST]").input_ids == [1, 733, 16289, 28793]


def test_run_writes_one_line_per_input_line_in_order(tmp_path: Path, models_dir: Path) -> None:
    lines = EXAMPLES.read_text().splitlines()
    bad_lines = [
        json.dumps({"prompt": "hi", "temperature": 9}).encode(),
        b"not json",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "\xff\xfe"}',
        lines[5].encode(),  # its custom_id comes again, further on
        b"[1, 2]",
    ]
    source = tmp_path / "in.jsonl"
    encoded = [line.encode() for line in lines]
    source.write_bytes(b"\n".join([*encoded[:3], *bad_lines, *encoded[3:]]) + b"\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "MBATCH_MODELS_DIR": str(models_dir)}
    result = subprocess.run(
        services.mbatch("run", str(source), "-o", str(out), "--state-dir", str(tmp_path / "state")),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr  # six lines failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["line"] for row in rows] == list(range(1, len(lines) + 7))
    failed = [row for row in rows if row["status"] != "succeeded"]
    assert [row["line"] for row in failed] == [4, 5, 6, 7, 9, 12]  # 12: request-1 again
    assert failed[0]["error"]["param"] == "temperature"
    assert failed[5]["error"]["param"] == "custom_id"
    for row in rows:
        if row["status"] == "succeeded":
            assert row["usage"]["completion_tokens"] > 0 and row["cost"]["total"] > 0
    assert {row.get("custom_id") for row in rows} >= {"request-1", "request-2"}
    assert f"jobs: {len(rows)} ({len(rows) - 6} succeeded, 6 failed)" in result.stderr
    assert "completion tokens/s" in result.stderr and "cost: $" in result.stderr
    # What a user needs (the progress bar, the summary, warnings) and no library chatter.
    assert not [line for line in result.stderr.splitlines() if " INFO " in line], result.stderr
    # Nor the warnings libraries print at every start about kernels the engine does not use.
    noise = ("torchao", "_pytree")
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in noise)]


def test_submit_waits_and_downloads_the_output_and_error_files(
    stack: Stack, tmp_path: Path
) -> None:
    rows = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-random-mistral", "prompt": f"Count {i}:", "max_tokens": 3},
        }
        for i in range(12)
    ]
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    estimate = subprocess.run(
        services.mbatch("estimate", str(source)), capture_output=True, text=True, check=True
    )
    counted = json.loads(estimate.stdout.splitlines()[-1])
    assert (counted["valid_lines"], counted["invalid_lines"]) == (12, 1)

    key = create_key(stack.env, "gina")
    result = subprocess.run(
        services.mbatch("submit", str(source), "--wait", "--output-dir", str(tmp_path)),
        env={**stack.env, "MBATCH_API_URL": stack.api_url, "MBATCH_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # one line failed
    assert "completed: 12 of 13 lines completed, 1 failed" in result.stdout
    outputs = (tmp_path / "questions.output.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in outputs) == sorted(
        row["custom_id"] for row in rows
    )
    usage = [json.loads(line)["response"]["body"]["usage"] for line in outputs]
    assert sum(u["prompt_tokens"] for u in usage) == counted["prompt_tokens"]
    errors = (tmp_path / "questions.error.jsonl").read_text().splitlines()
    assert json.loads(errors[0])["error"]["line"] == 13
