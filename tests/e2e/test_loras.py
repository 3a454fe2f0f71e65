"""Jobs with LoRA adapters through the whole stack: uploads to the S3 server, one worker
process, one static batch that mixes adapters, base rows and adapters that cannot be used."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.db import session_scope
from jobs.models import Job
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage, v1_tokenizer
from tests.adapters import files, greedy_alone, make_adapter
from tests.conftest import BUCKET, Stack, create_key
from tests.e2e.test_stack import FINISHED, submit, wait_for_status

TARGETS = {
    "style-qv": ("q_proj", "v_proj"),
    "style-all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "style-mlp": ("down_proj",),
}
PROMPTS = ["Describe the sea.", "Count to five."]


@pytest.fixture(scope="module")
def key(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key(stack.env, 'dana')}"}


@pytest.fixture(scope="module")
def adapter_dirs(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-adapters")
    return {
        name: make_adapter(models_dir / "tiny-random-mistral", root / name, targets=targets, seed=i)
        for i, (name, targets) in enumerate(TARGETS.items())
    }


def upload(stack: Stack, key: dict[str, str], name: str, folder: Path) -> dict[str, Any]:
    response = httpx.post(
        f"{stack.api_url}/v1/loras",
        data={"name": name, "base_model": "tiny-random-mistral"},
        files=files(folder),
        headers=key,
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_one_batch_mixes_adapters_and_base_rows_and_bad_adapters_fail_alone(
    stack: Stack,
    key: dict[str, str],
    settings: Settings,
    s3_client: Any,
    models_dir: Path,
    adapter_dirs: dict[str, Path],
) -> None:
    for name, folder in adapter_dirs.items():
        upload(stack, key, name, folder)
    deleted = upload(stack, key, "deleted-later", adapter_dirs["style-qv"])
    corrupted = upload(stack, key, "corrupted", adapter_dirs["style-all"])

    # Everything comes due at once, so one worker claims it all as one batch; the adapters
    # are spoilt before then.
    due = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    common = {"max_tokens": 8, "temperature": 0, "run_at": due}
    good = [
        (prompt, lora, submit(stack, key, {"prompt": prompt, "lora": lora, **common}))
        for prompt in PROMPTS
        for lora in [*TARGETS, None]
    ]
    doomed = [
        submit(stack, key, {"prompt": PROMPTS[0], "lora": "deleted-later", **common}),
        submit(stack, key, {"prompt": PROMPTS[0], "lora": "corrupted", **common}),
    ]
    gone = httpx.delete(f"{stack.api_url}/v1/loras/{deleted['id']}", headers=key)
    assert gone.status_code == 204
    s3_client.put_object(
        Bucket=BUCKET,
        Key=f"data/loras/{corrupted['id']}/adapter_model.safetensors",
        Body=(adapter_dirs["style-mlp"] / "adapter_model.safetensors").read_bytes(),
    )

    tokenizer = v1_tokenizer()
    outputs = {}
    for prompt, lora, job in good:
        finished = wait_for_status(stack, key, job["id"], FINISHED)
        assert finished["status"] == "succeeded", finished
        outputs[(prompt, lora)] = finished["result"]["response"]
        ids = tokenizer.encode_chat([ChatMessage("user", prompt)])
        folder = adapter_dirs[lora] if lora is not None else None
        reference = greedy_alone(models_dir / "tiny-random-mistral", folder, ids, 8)
        assert finished["result"]["response"] == tokenizer.decode(reference), (prompt, lora)
    for prompt in PROMPTS:
        for lora in TARGETS:
            assert outputs[(prompt, lora)] != outputs[(prompt, None)], (prompt, lora)

    gone_job = wait_for_status(stack, key, doomed[0]["id"], FINISHED)
    assert gone_job["status"] == "failed" and gone_job["error"]["code"] == "lora_not_found"
    bad_job = wait_for_status(stack, key, doomed[1]["id"], FINISHED)
    assert bad_job["status"] == "failed" and bad_job["error"]["code"] == "lora_load_failed"
    assert "sha256" in bad_job["error"]["message"]

    with session_scope(settings.database_url) as session:
        rows = [session.get(Job, job["id"]) for *_, job in good] + [
            session.get(Job, job["id"]) for job in doomed
        ]
        assert len({row.group_id for row in rows if row}) == 1
