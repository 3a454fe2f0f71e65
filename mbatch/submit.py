"""`mbatch submit`: a JSONL file to a running API as a batch, and `mbatch estimate`: its
tokens and cost, counted locally before anything runs."""

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from jobs.batches import estimate
from jobs.schemas.openai import CHAT_ENDPOINT
from jobs.settings import Settings

ENDED = {"completed", "failed", "expired", "cancelled"}


def endpoint_of(path: Path) -> str:
    """The `url` of the file's first line that has one: a batch has one endpoint."""
    with path.open("rb") as lines:
        for raw in lines:
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                continue
            if isinstance(url, str):
                return url
    return CHAT_ENDPOINT


def estimate_file(path: Path, endpoint: str | None, settings: Settings) -> dict[str, Any]:
    """Every line checked and its prompt tokenized, as the API's dry run does (adapters are
    not checked: they live in the API's database)."""
    with path.open("rb") as stream:
        found = estimate(None, stream, "", path.name, endpoint or endpoint_of(path), settings)
    for error in found.errors:
        print(error["message"], file=sys.stderr)
    return found.model_dump(exclude={"errors"})


class ApiClient:
    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=600),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def download(self, file_id: str, target: Path) -> None:
        with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
            response.raise_for_status()
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)


def submit_file(
    path: Path, endpoint: str | None, api: ApiClient, wait: bool, output_dir: Path
) -> int:
    with path.open("rb") as stream:
        file = api.call(
            "POST", "/v1/files", files={"file": (path.name, stream)}, data={"purpose": "batch"}
        )
    batch = api.call(
        "POST",
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": endpoint or endpoint_of(path)},
    )
    print(f"batch {batch['id']} ({file['id']}, {file['bytes']} bytes)")
    if not wait:
        return 0
    started = time.monotonic()
    with tqdm(total=None, unit="line", desc="running", file=sys.stderr) as bar:
        while batch["status"] not in ENDED:
            time.sleep(1)
            batch = api.call("GET", f"/v1/batches/{batch['id']}")
            counts, usage = batch["request_counts"], batch.get("usage") or {}
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            rate = usage.get("completion_tokens", 0) / max(time.monotonic() - started, 1e-9)
            bar.set_postfix(status=batch["status"], failed=counts["failed"], tokens_s=f"{rate:.0f}")
            bar.refresh()
    stem = path.name.removesuffix(".jsonl")
    for kind in ("output", "error"):
        if batch.get(f"{kind}_file_id"):
            target = output_dir / f"{stem}.{kind}.jsonl"
            api.download(batch[f"{kind}_file_id"], target)
            print(f"{kind} file: {target}")
    counts, usage = batch["request_counts"], batch.get("usage") or {}
    print(
        f"{batch['status']}: {counts['completed']} of {counts['total']} lines completed, "
        f"{counts['failed']} failed, {usage.get('total_tokens', 0)} tokens, "
        f"${usage.get('estimated_cost', 0):.6f}"
    )
    return 0 if batch["status"] == "completed" and not counts["failed"] else 1
