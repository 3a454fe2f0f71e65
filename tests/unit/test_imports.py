"""The import rules of SPEC section 6, as tests that fail when code breaks them.

`api/` and `worker/` build on `jobs/`; `jobs/` imports neither; `api/` never imports `worker/`
(the API process loads no model and no torch), `worker/` never imports `api/`; migrations
import the models from `jobs/` only. The command line (`mbatch/`) builds on all of them, so
none of them, and no shared test helper, imports it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# Top-level packages each part of the code must not import.
# The model's libraries belong to the worker: the API counts tokens with the tokenizer alone.
MODEL_LIBRARIES = {"torch", "transformers", "peft"}
FORBIDDEN = {
    "jobs": {"api", "worker", "mbatch", *MODEL_LIBRARIES},
    "api": {"worker", "mbatch", *MODEL_LIBRARIES},
    "worker": {"api", "mbatch"},
    "migrations": {"api", "worker", "mbatch"},
    "tests/factories.py": {"mbatch"},
}
# What the API process must never load.
NOT_IN_THE_API = ("torch", "transformers", "peft", "gptqmodel", "optimum", "worker")


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function, by full name."""
    found = set()
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package upwards
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.add(node.module)
    return found


def sources(part: str) -> list[Path]:
    path = ROOT / part
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_it_builds_on(part: str) -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sources(part)
        for module in sorted(imported_modules(path))
        if module.split(".")[0] in FORBIDDEN[part]
    ]
    assert sources(part), f"nothing to check at {part}"
    assert not broken, "\n".join(broken)


def test_the_api_loads_no_model_code() -> None:
    """Imports `api.app` in a fresh interpreter, as `mbatch api` does, and looks at what
    came with it."""
    code = "import sys, api.app\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split()) & set(NOT_IN_THE_API)
    assert not loaded, f"importing api.app loads {sorted(loaded)}"


def test_the_webhooks_worker_loads_no_model_code() -> None:
    """`mbatch webhooks` delivers callbacks: no model, no torch, not the GPU worker's tasks."""
    code = "import sys, worker.webhooks\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    modules = set(result.stdout.split())
    loaded = {m.split(".")[0] for m in modules} & MODEL_LIBRARIES
    loaded |= modules & {"worker.tasks", "worker.runtime", "worker.celery_app", "worker.engine"}
    assert not loaded, f"importing worker.webhooks loads {sorted(loaded)}"
