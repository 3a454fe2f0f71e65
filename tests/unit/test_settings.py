"""Settings are checked at start-up, alone and against each other, and a bad one stops the
process with one line naming its variable."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jobs.settings import Settings, error_lines

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MBATCH_"):
            monkeypatch.delenv(name)


def problems(**values: Any) -> list[str]:
    try:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    except ValidationError as exc:
        return error_lines(exc)
    return []


def test_the_defaults_and_the_test_stacks_settings_are_good() -> None:
    assert problems() == []
    assert problems(lease_seconds=4, batch_wait_ms=400, requeue_after_seconds=30) == []
    assert problems(batch_wait_ms=0, batch_quiet_ms=0, result_inline_max_bytes=0) == []


def test_a_bad_value_is_named_by_its_variable() -> None:
    assert problems(max_loras=0) == ["MBATCH_MAX_LORAS=0: must be at least 1"]
    assert problems(maintenance_interval_seconds=0) == [
        "MBATCH_MAINTENANCE_INTERVAL_SECONDS=0: must be more than 0"
    ]
    assert problems(max_batch_size=0, lease_seconds=-1) == [
        "MBATCH_MAX_BATCH_SIZE=0: must be at least 1",
        "MBATCH_LEASE_SECONDS=-1: must be at least 1",
    ]
    [not_a_number] = problems(max_attempts="three")
    assert not_a_number.startswith("MBATCH_MAX_ATTEMPTS=three: ")


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBATCH_MAX_LORAS", "0")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert error_lines(caught.value) == ["MBATCH_MAX_LORAS=0: must be at least 1"]


@pytest.mark.parametrize(
    "url", ["s3://bucket", "s3://bucket/some/prefix", "file:///var/mbatch", "file://./.mbatch/x"]
)
def test_a_usable_storage_url(url: str) -> None:
    assert problems(storage_url=url) == []


@pytest.mark.parametrize("url", ["", "s3://", "s3:///prefix", "file://", "/var/mbatch", "gs://b"])
def test_an_unusable_storage_url(url: str) -> None:
    assert problems(storage_url=url) == [
        f"MBATCH_STORAGE_URL={url}: must be s3://bucket[/prefix] or file://path"
    ]


def test_the_visibility_timeout_outlasts_the_least_time_a_message_is_held() -> None:
    """A message is acknowledged after the straggler wait and a batch run under a lease;
    Redis must not deliver it again before."""
    assert problems(visibility_timeout_seconds=61, lease_seconds=60, batch_wait_ms=500) == []
    expected = (
        "MBATCH_VISIBILITY_TIMEOUT_SECONDS=60: must be more than MBATCH_LEASE_SECONDS plus "
        "MBATCH_BATCH_WAIT_MS (60.5 s), the least time a message is held"
    )
    assert problems(visibility_timeout_seconds=60, lease_seconds=60, batch_wait_ms=500) == [
        expected
    ]
    assert problems(visibility_timeout_seconds=900) != []  # the default lease is 900 s


@pytest.mark.parametrize("command", ["api", "beat"])
def test_a_bad_setting_stops_the_command_with_one_line(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MBATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "mbatch", command],
        env={**env, "MBATCH_MAX_LORAS": "0"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mbatch: MBATCH_MAX_LORAS=0: must be at least 1"]
