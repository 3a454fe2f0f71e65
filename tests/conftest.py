import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from jobs.settings import Settings
from tests import services
from worker.engine.tiny import make_tiny_model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per session where the worker looks for it."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny-random-mistral")
    return root


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    from migrations.runner import upgrade

    name = services.create_database()
    url = services.database_url(name)
    upgrade(url)
    yield url
    from jobs.db import get_engine

    get_engine(url).dispose()
    services.drop_database(name)


@pytest.fixture(scope="session")
def broker_url() -> str:
    return services.redis_url()


@pytest.fixture(scope="session")
def s3_url(log_dir: Path) -> Iterator[str]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, url = services.start_s3_server(log_dir)
    yield url
    proc.stop()


BUCKET = "mbatch-test"


def service_env(
    database_url: str, broker_url: str, s3_url: str, models_dir: Path
) -> dict[str, str]:
    """The environment a deployment would give the API and the workers: where the services
    are, and the model."""
    return {
        **os.environ,
        "MBATCH_DATABASE_URL": database_url,
        "MBATCH_BROKER_URL": broker_url,
        "MBATCH_STORAGE_URL": f"s3://{BUCKET}/data",
        "MBATCH_S3_ENDPOINT_URL": s3_url,
        "MBATCH_MODELS_DIR": str(models_dir),
        "MBATCH_MODEL": "tiny-random-mistral",
    }


@pytest.fixture(scope="session")
def stack_env(database_url: str, broker_url: str, s3_url: str, models_dir: Path) -> dict[str, str]:
    """The shared stack's environment, tuned so that the tests see faults within seconds."""
    return {
        **service_env(database_url, broker_url, s3_url, models_dir),
        # Short leases and frequent maintenance, so a dead worker is noticed within seconds.
        "MBATCH_LEASE_SECONDS": "4",
        "MBATCH_MAINTENANCE_INTERVAL_SECONDS": "1",
        "MBATCH_REQUEUE_AFTER_SECONDS": "30",
        # A batch step that fails is tried again within a second, three times in all.
        "MBATCH_BATCH_STEP_ATTEMPTS": "3",
        "MBATCH_BATCH_STEP_RETRY_SECONDS": "0.5",
        # Long enough for jobs sent together from several clients to meet in one batch.
        "MBATCH_BATCH_WAIT_MS": "400",
        # Every non-empty result goes to object storage, so the tests see it there.
        "MBATCH_RESULT_INLINE_MAX_BYTES": "1",
    }


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings(
        _env_file=None,
        **{
            key.removeprefix("MBATCH_").lower(): value
            for key, value in stack_env.items()
            if key.startswith("MBATCH_")
        },
    )


@pytest.fixture(scope="session")
def s3_client(s3_url: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")


def create_key(env: dict[str, str], owner: str) -> str:
    """A key made the way an operator makes one: `mbatch keys create`, last line."""
    out = subprocess.run(
        services.mbatch("keys", "create", "--name", owner),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    api: services.Process
    api_url: str
    worker: services.Process

    def restart_worker(self) -> None:
        self.worker.kill()
        self.worker = services.start_worker(self.env, self.log_dir)


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str], log_dir: Path) -> Iterator[Stack]:
    """`mbatch api` and `mbatch worker` as separate processes on the real services."""
    api, api_url = services.start_api(stack_env, log_dir)
    worker = services.start_worker(stack_env, log_dir)
    running = Stack(stack_env, log_dir, api, api_url, worker)
    yield running
    running.worker.stop()
    running.api.stop()
