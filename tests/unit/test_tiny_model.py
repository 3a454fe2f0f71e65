"""`make_tiny_model` leaves a complete model folder or none: callers take a folder that exists
(with a `config.json`) as a finished model."""

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from worker.engine.tiny import make_tiny_model

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
}


def test_a_build_that_fails_midway_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tokenizer(*args: Any, **kwargs: Any) -> Any:
        raise OSError("No space left on device")

    # The tokenizer is written after the weights: failing it leaves a half-built model.
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_tokenizer)
    parent = tmp_path / "models"
    target = parent / "tiny-random-mistral"
    with pytest.raises(OSError, match="No space left"):
        make_tiny_model(target)
    assert not target.exists()
    assert list(parent.iterdir()) == []  # and no staging folder either

    monkeypatch.undo()
    make_tiny_model(target)  # the next run builds it whole
    assert {path.name for path in target.iterdir()} == FILES


def test_a_build_writes_a_complete_folder_and_keeps_one_already_there(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    assert make_tiny_model(target) == target
    assert {path.name for path in target.iterdir()} == FILES
    assert {path.name for path in tmp_path.iterdir()} == {"tiny"}
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer("[INST]").input_ids == [1, 733, 16289, 28793]

    weights = (target / "model.safetensors").read_bytes()
    make_tiny_model(target, seed=7)  # other weights, were it built again
    assert (target / "model.safetensors").read_bytes() == weights


def test_an_empty_target_folder_is_filled(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    make_tiny_model(target)
    assert {path.name for path in target.iterdir()} == FILES


def test_a_folder_of_something_else_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
