"""The `mbatch` command line."""

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    from mbatch.runner import run_file

    return run_file(args.file, args.output, args.model, args.state_dir)


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    run_worker(args.model, args.weights, args.loglevel)
    return 0


def _cmd_beat(args: argparse.Namespace) -> int:
    from jobs.db import session_scope
    from jobs.maintenance import repeat, run_pass
    from jobs.queue import CeleryJobQueue
    from jobs.schedules import fire_due
    from jobs.settings import get_settings
    from jobs.storage import storage_from_settings

    settings = get_settings()
    queue = CeleryJobQueue(settings)
    storage = storage_from_settings(settings)

    def scope():  # type: ignore[no-untyped-def]
        return session_scope(settings.database_url)

    def fire() -> None:
        fire_due(scope, storage, queue, settings)

    stop = threading.Event()
    maintenance = threading.Thread(
        target=repeat,
        args=(
            settings.maintenance_interval_seconds,
            lambda: run_pass(scope, storage, queue, settings),
            "maintenance",
            stop,
        ),
        name="maintenance",
        daemon=True,
    )
    maintenance.start()
    try:
        # Schedules fire within about a second of their time, not at the next maintenance
        # pass (30 s apart by default); any number of beats may run, each fire runs once.
        repeat(1.0, fire, "schedules", stop)
    finally:
        stop.set()
        maintenance.join(timeout=settings.maintenance_interval_seconds)
    return 0


def _cmd_webhooks(args: argparse.Namespace) -> int:
    from worker.webhooks import run_webhooks_worker

    run_webhooks_worker(args.loglevel)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from jobs.settings import get_settings
    from migrations.runner import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest revision")
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from jobs.db import session_scope
    from jobs.keys import create_key
    from jobs.settings import get_settings

    with session_scope(get_settings().database_url) as session:
        secret = create_key(session, args.name)
    print(f"API key for {args.name} (shown once; keep it secret):")
    print(secret)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from mbatch.submit import ApiClient, submit_file

    if not args.key:
        raise SystemExit("an API key is needed: --key or MBATCH_API_KEY")
    api = ApiClient(args.api_url, args.key)
    return submit_file(args.file, args.endpoint, api, args.wait, args.output_dir)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from jobs.settings import get_settings
    from mbatch.submit import estimate_file

    settings = get_settings()
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    print(json.dumps(estimate_file(args.file, args.endpoint, settings)))
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    if args.awq:
        from worker.engine.awq import make_tiny_awq_model

        print(make_tiny_awq_model(args.dir))
        return 0
    from worker.engine.tiny import make_tiny_model

    print(make_tiny_model(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a JSONL file through the whole pipeline in one process")
    run.add_argument("file", type=Path)
    run.add_argument("-o", "--output", type=Path, default=None)
    run.add_argument("--model", default="tiny-random-mistral")
    run.add_argument("--state-dir", type=Path, default=Path(".mbatch"))
    run.set_defaults(handler=_cmd_run)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(handler=_cmd_api)

    worker = sub.add_parser("worker", help="load a model and serve its queue")
    worker.add_argument("--model", required=True)
    worker.add_argument("--weights", type=Path, default=None)
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=_cmd_worker)

    beat = sub.add_parser(
        "beat", help="fire due schedules, and run the maintenance pass on a timer"
    )
    beat.set_defaults(handler=_cmd_beat)

    webhooks = sub.add_parser("webhooks", help="deliver webhook events (the delivery worker)")
    webhooks.add_argument("--loglevel", default="INFO")
    webhooks.set_defaults(handler=_cmd_webhooks)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(handler=_cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it as the last line")
    create.add_argument("--name", required=True)
    create.set_defaults(handler=_cmd_keys_create)

    submit = sub.add_parser("submit", help="send a JSONL batch file to a running API")
    submit.add_argument("file", type=Path)
    submit.add_argument(
        "--wait", action="store_true", help="follow it, writing its lines as they finish"
    )
    submit.add_argument("--endpoint", default=None, help="default: the first line's url")
    submit.add_argument(
        "--api-url", default=os.environ.get("MBATCH_API_URL", "http://127.0.0.1:8000")
    )
    submit.add_argument("--key", default=os.environ.get("MBATCH_API_KEY"))
    submit.add_argument("--output-dir", type=Path, default=Path("."))
    submit.set_defaults(handler=_cmd_submit)

    estimate = sub.add_parser("estimate", help="count a JSONL file's tokens and cost range")
    estimate.add_argument("file", type=Path)
    estimate.add_argument("--endpoint", default=None, help="default: the first line's url")
    estimate.add_argument("--model", default=None, help="for lines that name no model")
    estimate.set_defaults(handler=_cmd_estimate)

    tiny = sub.add_parser("make-tiny-model", help="build the tiny random Mistral model")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--awq",
        action="store_true",
        help="write it as a 4-bit AWQ checkpoint, with its dequantized twin in DIR/dequantized",
    )
    tiny.set_defaults(handler=_cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from jobs.settings import Settings, error_lines

    args = build_parser().parse_args(argv)
    # `mbatch run` shows its progress bar and summary, and besides them only warnings and
    # errors; the services log what they do.
    logging.basicConfig(
        level=logging.WARNING if args.command == "run" else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.handler(args)
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        # A bad setting stops the command at start-up: one line for each, no traceback.
        for line in error_lines(exc):
            print(f"mbatch: {line}", file=sys.stderr)
        code = 2
    sys.exit(code)
