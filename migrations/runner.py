"""Apply migrations programmatically: the same path for `mbatch migrate`, `mbatch run` and tests."""

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", quiet: bool = False) -> None:
    if quiet:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    command.upgrade(alembic_config(database_url), revision)
