"""The slot cache: its own layout operations, and a sliding-window model against HF `generate`."""

import random
from pathlib import Path

import pytest
import torch

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from tests.unit.test_engine import hf_greedy
from worker.engine.decode import _CACHES, generate
from worker.engine.kv_cache import SlotCache, decode_inputs, prefill_inputs
from worker.engine.loader import LoadedModel, load_model
from worker.engine.tiny import make_tiny_model

WINDOW = 16


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with Mistral v0.1's sliding window, made short enough to matter."""
    folder = tmp_path_factory.mktemp("windowed") / "tiny-random-mistral"
    make_tiny_model(folder, sliding_window=WINDOW)
    spec = resolve_model("tiny-random-mistral")
    return load_model(spec, Settings(models_dir=folder.parent), weights=Path(folder))


def test_a_sliding_window_model_matches_generate_alone(windowed: LoadedModel) -> None:
    assert windowed.model.config.sliding_window == WINDOW
    rng = random.Random(2)
    # Prompts shorter and longer than the window, decoding well past it.
    prompts = [[1] + [rng.randint(100, 31999) for _ in range(n)] for n in (3, 12, 30, 45)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (30, 8, 24, 20)]
    batch = generate(windowed, prompts, params)
    for i, prompt in enumerate(prompts):
        assert batch[i].token_ids == hf_greedy(windowed, prompt, params[i].max_tokens), i


def test_moves_and_growth_keep_what_slots_hold(models_dir: Path) -> None:
    loaded = load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))
    cache = SlotCache(
        loaded.model.config, slots=4, max_len=6, dtype=torch.float32, device=loaded.device
    )
    for layer in cache.slot_layers:
        assert layer.keys is not None
        layer.keys.copy_(torch.randn_like(layer.keys))
    before = [layer.keys.clone() for layer in cache.slot_layers if layer.keys is not None]
    cache.move([3, 2], [0, 1], columns=5)
    cache.grow(10)
    assert cache.max_len == 10
    for layer, old in zip(cache.slot_layers, before, strict=True):
        assert layer.keys is not None and layer.keys.shape[2] == 10
        assert torch.equal(layer.keys[0, :, :5], old[3, :, :5])
        assert torch.equal(layer.keys[1, :, :5], old[2, :, :5])
        assert torch.equal(layer.keys[2:, :, :6], old[2:])
        assert not layer.keys[:, :, 6:].any()


def test_masks_keep_rows_to_their_own_columns() -> None:
    allowed, positions = prefill_inputs([2, 4], width=4, window=None, device=torch.device("cpu"))
    # Row 0 is left-padded by 2: its padding columns see themselves alone.
    assert allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    first, next_column = torch.tensor([2, 0]), torch.tensor([4, 5])
    allowed, positions = decode_inputs(first, next_column, kv_len=6, window=3)
    assert allowed[:, 0, 0].int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert positions.tolist() == [[2], [5]]


def test_what_a_slots_last_row_left_cannot_reach_the_next_one(models_dir: Path) -> None:
    """Masked columns still meet a zero weight, and zero times NaN is NaN: whatever an earlier
    row left in a slot (here NaN, as an fp16 overflow leaves) must be gone or unread."""
    loaded = load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))
    rng = random.Random(4)
    prompts = [[1] + [rng.randint(100, 31999) for _ in range(n)] for n in (40, 5, 20)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (20, 30, 6)]
    first = generate(loaded, prompts, params)
    cache = _CACHES[loaded.model]
    assert max(cache.written) > 40  # the rows left their keys and values behind
    with torch.inference_mode():  # the cache's tensors were made in it
        for layer in cache.slot_layers:
            assert layer.keys is not None and layer.values is not None
            for slot, columns in enumerate(cache.written):
                layer.keys[slot, :, :columns] = float("nan")
                layer.values[slot, :, :columns] = float("nan")
    # Shorter prompts now, in the same slots of the same cache.
    again = generate(
        loaded, [prompts[1], prompts[2], prompts[0]], [params[1], params[2], params[0]]
    )
    assert _CACHES[loaded.model] is cache
    assert [g.token_ids for g in again] == [
        first[1].token_ids,
        first[2].token_ids,
        first[0].token_ids,
    ]
