"""Reading and checking a batch's input lines. `LineChecker` turns each line, whatever it holds,
into a `ValidLine` (a prepared job and its adapter) or an `InvalidLine` (its number, code and
why, clipped so that it can always be stored); `check_file` runs it over a file and
`owner_adapters` looks an owner's adapters up once per name. It needs no database of its own:
the adapter lookup is passed in, so lines are checked the same for a batch, an estimate or a
unit test.
"""

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs import files
from jobs.errors import InvalidParameter, MbatchError, describe, main_error
from jobs.loras import adapter_for_job
from jobs.registry import ModelSpec
from jobs.schemas.base import storable_text
from jobs.schemas.openai import BatchLine
from jobs.service import PreparedJob, prepare_openai
from jobs.settings import Settings
from jobs.storage import StorageUnavailable

log = logging.getLogger(__name__)

MAX_CUSTOM_ID_CHARS = 512
MAX_PARAM_CHARS = 256
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class ValidLine:
    line: int
    custom_id: str
    prepared: PreparedJob
    lora_id: str | None


def clip(text: str, limit: int) -> str:
    """Text a line error can always be stored with, whatever the line held: NUL and lone
    surrogates escaped, and no longer than its column."""
    text = text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class InvalidLine:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", clip(self.message, MAX_MESSAGE_CHARS))
        if self.param is not None:
            object.__setattr__(self, "param", clip(self.param, MAX_PARAM_CHARS))


AdapterLookup = Callable[[ModelSpec, str], str]


def _custom_id_problem(custom_id: Any) -> str | None:
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id is required, as a non-empty string"
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters"
    try:
        storable_text(custom_id)
    except ValueError as exc:
        return f"custom_id {exc}"
    return None


class LineChecker:
    """Checks lines one at a time, remembering the custom_ids seen so far. Whatever a line
    holds, it becomes a valid line or an invalid one with its number: never an exception."""

    def __init__(self, endpoint: str, settings: Settings, adapter_id: AdapterLookup | None) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.adapter_id = adapter_id
        self.seen: set[str] = set()

    def check(self, number: int, raw: bytes | None) -> ValidLine | InvalidLine:
        try:
            return self._check(number, raw)
        except (SQLAlchemyError, StorageUnavailable):
            raise  # the database or storage failed, not the line: the step is tried again
        except Exception as exc:  # a line we did not foresee fails alone, not its batch
            log.warning("line %d could not be checked", number, exc_info=True)
            message = f"line {number}: could not be read ({type(exc).__name__})"
            return InvalidLine(number, None, "invalid_request", message)

    def _check(self, number: int, raw: bytes | None) -> ValidLine | InvalidLine:
        custom_id: str | None = None

        def invalid(code: str, message: str, param: str | None = None) -> InvalidLine:
            return InvalidLine(number, custom_id, code, f"line {number}: {message}", param)

        if raw is None:
            return invalid("line_too_long", "longer than the largest request accepted")
        try:
            data = json.loads(raw)
        except RecursionError:
            return invalid("invalid_json", "not JSON we read (nested too deeply)")
        except ValueError as exc:  # not UTF-8, not JSON, an integer of thousands of digits
            return invalid("invalid_json", f"not JSON ({exc})")
        if not isinstance(data, dict):
            return invalid("invalid_request", "a line is a JSON object")
        if (problem := _custom_id_problem(data.get("custom_id"))) is not None:
            code = "missing_custom_id" if not data.get("custom_id") else "invalid_parameter"
            return invalid(code, problem, "custom_id")
        custom_id = data["custom_id"]
        if custom_id in self.seen:
            return invalid(
                "duplicate_custom_id", f"custom_id {custom_id!r} is used twice", "custom_id"
            )
        self.seen.add(custom_id)
        if data.get("url") != self.endpoint:
            return invalid(
                "invalid_url", f"url {data.get('url')!r} is not the batch's {self.endpoint}", "url"
            )
        try:
            request = BatchLine.model_validate(data)
        except ValidationError as exc:
            param, message = describe(main_error(exc.errors()), prefix="")
            return invalid("invalid_parameter", message, param)
        except MbatchError as exc:
            return invalid(exc.code, exc.message, exc.param)
        try:
            body = request.parsed_body()
            if body.model is None:
                body = body.model_copy(update={"model": self.settings.model})
            prepared = prepare_openai(body, self.settings)
            lora_id = None
            if prepared.lora is not None and self.adapter_id is not None:
                lora_id = self.adapter_id(prepared.spec, prepared.lora)
        except ValidationError as exc:
            param, message = describe(main_error(exc.errors()), prefix="body")
            return invalid("invalid_parameter", message, param)
        except MbatchError as exc:
            return invalid(exc.code, exc.message, f"body.{exc.param}" if exc.param else None)
        return ValidLine(number, custom_id, prepared, lora_id)


def owner_adapters(session: Session, owner: str) -> AdapterLookup:
    """Adapter lookups for one owner, each (model, name) asked of the database once, whether
    it is found or refused."""
    known: dict[tuple[str, str], str | InvalidParameter] = {}

    def lookup(spec: ModelSpec, lora: str) -> str:
        key = (spec.name, lora)
        if key not in known:
            try:
                known[key] = adapter_for_job(session, owner, spec, lora).id
            except InvalidParameter as refused:  # a name refused once is refused on every line
                known[key] = refused
        found = known[key]
        if isinstance(found, InvalidParameter):
            raise found.with_traceback(None)  # raised again: its old traceback would pile up
        return found

    return lookup


def check_file(
    stream: BinaryIO, checker: LineChecker, max_line_bytes: int
) -> Iterator[ValidLine | InvalidLine]:
    """Every non-blank line of a file, checked, in order."""
    for number, raw in enumerate(files.read_lines(stream, max_line_bytes), start=1):
        if raw is not None and not raw.strip():
            continue
        yield checker.check(number, raw)
