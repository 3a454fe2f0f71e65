"""`MBATCH_COMPILE`: the decode step under torch.compile gives the tokens the eager step does."""

import random
import shutil
from pathlib import Path

import pytest

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from worker.engine.decode import generate
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor, torch.compile's CPU backend, needs a C++ compiler and none is installed",
)
def test_the_compiled_step_gives_the_eager_tokens(loaded: LoadedModel) -> None:
    rng = random.Random(8)
    prompts = [[1] + [rng.randint(100, 31999) for _ in range(n)] for n in (6, 25, 14)]
    # Rows that end at different steps: the compiled step keeps every slot, idle ones too.
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (3, 8, 5)]
    eager = generate(loaded, prompts, params)
    compiled = generate(loaded, prompts, params, compile=True)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    assert [len(g.token_ids) for g in compiled] == [3, 8, 5]
