"""Real services for the tests: a fresh Postgres database, a Redis database, a moto S3 server,
and `mbatch api` / `mbatch worker` processes started as a user starts them."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import redis

PG_ADMIN_URL = os.environ.get("MBATCH_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST_URL = os.environ.get("MBATCH_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def create_database() -> str:
    name = "mbatch_test_" + secrets.token_hex(4)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def redis_url() -> str:
    """A Redis database of its own for this test session, emptied first."""
    db = 1 + secrets.randbelow(15)
    url = f"{REDIS_HOST_URL}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


class Process:
    """A child process whose output goes to a log file the tests can read."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no clean-up runs."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def start_s3_server(
    log_dir: Path, port: int | None = None, name: str = "moto"
) -> tuple[Process, str]:
    """moto's standalone server; on `port` to start it again where its clients look for it
    (it keeps everything in memory, so a restarted one is empty)."""
    port = port or free_port()
    env = {**os.environ}
    proc = Process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env,
        log_dir / f"{name}.log",
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/moto-api/").status_code < 500, 30, "the S3 server")
    return proc, url


def start_redis_server(log_dir: Path, port: int | None = None) -> tuple[Process, str]:
    """A Redis of the test's own that keeps nothing on disk: one started again on the same
    port is empty, as after a crash with persistence off."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("these tests start Redis servers of their own: install redis-server")
    port = port or free_port()
    proc = Process(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(log_dir)),
        ],
        {**os.environ},
        log_dir / "redis.log",
    )
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        with redis.Redis.from_url(url) as client:
            return bool(client.ping())

    wait_for(answers, 30, "the Redis server")
    return proc, url


def mbatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "mbatch", *args]


def start_api(env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process(mbatch("api", "--port", str(port)), env, log_dir / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, 60, "the API")
    return proc, url


def start_worker(env: dict[str, str], log_dir: Path, model: str = "tiny-random-mistral") -> Process:
    log_path = log_dir / f"worker-{secrets.token_hex(3)}.log"
    proc = Process(mbatch("worker", "--model", model), env, log_path)
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), 120, "the worker")
    if not proc.alive():
        raise RuntimeError("worker exited:\n" + proc.output())
    return proc


def start_webhooks(env: dict[str, str], log_dir: Path) -> Process:
    """`mbatch webhooks`, the delivery worker, once it consumes its queue."""
    log_path = log_dir / f"webhooks-{secrets.token_hex(3)}.log"
    proc = Process(mbatch("webhooks"), env, log_path)
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), 60, "the webhooks worker")
    if not proc.alive():
        raise RuntimeError("webhooks worker exited:\n" + proc.output())
    return proc
