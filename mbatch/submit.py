"""`mbatch submit`: a JSONL file to a running API as a batch, and `mbatch estimate`: its
tokens and cost, counted locally before anything runs."""

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

from jobs.batches import RESUME_HEADER, estimate
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

    def output_since(self, batch_id: str, after: int) -> tuple[int, Iterator[bytes]]:
        """The resume cursor and the batch's lines finished past line `after`, each as sent
        (a JSON object, without its newline), read as they arrive; the response is closed
        once they have all been read."""
        request = self.http.build_request(
            "GET", f"/v1/batches/{batch_id}/output", params={"after": after}
        )
        response = self.http.send(request, stream=True)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise SystemExit(f"GET {request.url.path}: {response.status_code} {response.text}")
        return int(response.headers[RESUME_HEADER]), _jsonl(response)


def _jsonl(response: httpx.Response) -> Iterator[bytes]:
    # Split on newlines alone: httpx's iter_lines also splits on the Unicode line breaks
    # (U+2028 and kin) that a JSON string may hold as they are.
    try:
        pending = bytearray()  # grown in place: a line longer than a chunk costs no copies
        for chunk in response.iter_bytes():
            first, *rest = chunk.split(b"\n")
            pending += first
            if rest:
                *complete, last = [bytes(pending), *rest]
                yield from (line for line in complete if line.strip())
                pending = bytearray(last)
        if pending.strip():
            yield bytes(pending)
    finally:
        response.close()


class OutputFollower:
    """Appends a running batch's lines to its output and error files as they finish: a line
    with a response to the one, a line with an error to the other, each once, so that a client
    stopped midway keeps every line it was sent.

    Each poll asks for the lines past the resume cursor of the one before, and so gets again
    the lines past that cursor that it already has: every line written and numbered past the
    cursor came in the last answer (it had finished then, and the cursor never goes back), so
    the ids of the last answer are all it needs to drop them, not the ids of the whole batch.
    """

    def __init__(self, api: ApiClient, batch_id: str, output: Path, errors: Path) -> None:
        self.api, self.batch_id = api, batch_id
        self.targets = {"output": output, "error": errors}
        self.files: dict[str, IO[bytes]] = {}
        self.after = 0
        self.last_answer: set[str] = set()

    def poll(self) -> int:
        """Write the lines that finished since the last poll; how many were new."""
        resume, lines = self.api.output_since(self.batch_id, self.after)
        answer: set[str] = set()
        new = 0
        for raw in lines:
            line = json.loads(raw)
            answer.add(line["id"])
            if line["id"] not in self.last_answer:
                kind = "output" if line.get("error") is None else "error"
                self._file(kind).write(raw + b"\n")
                new += 1
        for file in self.files.values():
            file.flush()
        self.after, self.last_answer = resume, answer
        return new

    def written(self) -> dict[str, Path]:
        """The files that hold a line, by kind (one with none is not made: the batch has no
        line of its kind, and no such file)."""
        return {kind: path for kind, path in self.targets.items() if kind in self.files}

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def _file(self, kind: str) -> IO[bytes]:
        if kind not in self.files:
            # Made afresh by the first line of its kind, as the download it replaces was.
            self.files[kind] = self.targets[kind].open("wb")
        return self.files[kind]


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
    print(f"batch {batch['id']} ({file['id']}, {file['bytes']} bytes)", flush=True)
    if not wait:
        return 0
    stem = path.name.removesuffix(".jsonl")
    follower = OutputFollower(
        api, batch["id"], output_dir / f"{stem}.output.jsonl", output_dir / f"{stem}.error.jsonl"
    )
    try:
        batch = _follow(api, batch, follower)
    finally:
        follower.close()
    for kind, target in follower.written().items():
        print(f"{kind} file: {target}")
    counts, usage = batch["request_counts"], batch.get("usage") or {}
    print(
        f"{batch['status']}: {counts['completed']} of {counts['total']} lines completed, "
        f"{counts['failed']} failed, {usage.get('total_tokens', 0)} tokens, "
        f"${usage.get('estimated_cost', 0):.6f}"
    )
    return 0 if batch["status"] == "completed" and not counts["failed"] else 1


def _follow(api: ApiClient, batch: dict[str, Any], follower: OutputFollower) -> dict[str, Any]:
    """Poll the batch until it ends, writing its lines as they finish; the batch as it ended."""
    started = time.monotonic()
    polled_at: tuple[int, int] | None = None
    with tqdm(total=None, unit="line", desc="running", file=sys.stderr) as bar:
        while True:
            # The status is read before the lines: once it says ended, every line has, and
            # this last poll brings the rest.
            ended = batch["status"] in ENDED
            counts, usage = batch["request_counts"], batch.get("usage") or {}
            # Lines are asked for only when more have finished (or refused lines may have
            # appeared, while it validates): a slow early line holds the cursor back, and
            # the lines past it would otherwise come again every second.
            finished = (counts["completed"], counts["failed"])
            if ended or finished != polled_at or batch["status"] == "validating":
                follower.poll()
                polled_at = finished
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            rate = usage.get("completion_tokens", 0) / max(time.monotonic() - started, 1e-9)
            bar.set_postfix(status=batch["status"], failed=counts["failed"], tokens_s=f"{rate:.0f}")
            bar.refresh()
            if ended:
                return batch
            time.sleep(1)
            batch = api.call("GET", f"/v1/batches/{batch['id']}")
