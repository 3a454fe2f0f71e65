"""`mbatch submit --wait` through the whole stack: the lines are in its files as they finish,
while the batch still runs, and once it has ended its files hold each line once."""

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests import services
from tests.conftest import Stack, create_key
from tests.e2e.test_batches import ENDED, chat_line, jsonl, slow_lines


def lines_in(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_submit_wait_writes_lines_as_they_finish_and_each_once(
    stack: Stack, tmp_path: Path
) -> None:
    # Quick lines, then lines that decode for a while, and one refused line.
    source = tmp_path / "slow.jsonl"
    source.write_bytes(jsonl([*slow_lines(12, 24), chat_line("hot", "hi", temperature=9)]))
    key = create_key(stack.env, "hana")
    api = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"})
    output, errors = tmp_path / "slow.output.jsonl", tmp_path / "slow.error.jsonl"
    submit = subprocess.Popen(
        services.mbatch("submit", str(source), "--wait", "--output-dir", str(tmp_path)),
        env={**stack.env, "MBATCH_API_URL": stack.api_url, "MBATCH_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert submit.stdout is not None
        batch_id = submit.stdout.readline().split()[1]
        services.wait_for(lambda: bool(lines_in(output)), 90, "the first output lines")
        # Written while the batch runs, not downloaded once it has ended.
        batch = api.get(f"/v1/batches/{batch_id}").json()
        assert batch["status"] not in ENDED
        assert {line["custom_id"] for line in lines_in(errors)} == {"hot"}
        assert api.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
        out, _ = submit.communicate(timeout=120)
    finally:
        submit.kill()
    assert submit.returncode == 1, out  # cancelled
    assert "cancelled:" in out and f"output file: {output}" in out

    ended = api.get(f"/v1/batches/{batch_id}").json()
    assert ended["status"] == "cancelled"
    for path, file_id in ((output, ended["output_file_id"]), (errors, ended["error_file_id"])):
        mine = lines_in(path)
        assert len({line["id"] for line in mine}) == len(mine)  # each line once
        theirs = api.get(f"/v1/files/{file_id}/content").text.splitlines()
        by_id = sorted(mine, key=lambda line: line["id"])
        assert by_id == sorted(map(json.loads, theirs), key=lambda line: line["id"])
    assert 0 < len(lines_in(output)) < ended["request_counts"]["total"]
