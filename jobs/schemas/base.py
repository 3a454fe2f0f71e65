"""What every request body has in common: strict types, and text that can be stored.

Strict, as OpenAI and Workers AI are: `"5"` is not an integer and `"yes"` is not a boolean
(an integer is still a number where a float is asked for). Every string in a body, however
deep in a list or an object, must be text that Postgres can keep and JSON can carry: no NUL,
no lone surrogate. One rule, so a field added later cannot forget it.
"""

from decimal import Decimal
from typing import Annotated, Any, ClassVar, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from jobs.registry import ModelSpec
from jobs.sampling import SamplingParams

# A body nested deeper than this is refused rather than walked: nothing we accept needs it.
MAX_DEPTH = 32


def storable_text(value: str) -> str:
    """Text Postgres can keep and JSON can carry: no NUL, no lone surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (no lone surrogate)") from exc
    return value


def check_storable(value: Any, depth: int = 0) -> Any:
    """`value` unchanged if every string in it (keys too) is storable text."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        storable_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, depth + 1)
            check_storable(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            check_storable(item, depth + 1)
    return value


def _number_not_text(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("must be a number")
    return value


# Money is read exactly, from a JSON number (strict Decimal would take only Decimal objects).
Money = Annotated[Decimal, BeforeValidator(_number_not_text), Field(strict=False)]


class RequestModel(BaseModel):
    """Base of every request body and its parts."""

    model_config = ConfigDict(strict=True)
    # Fields whose contents another model checks, with more precise names for what it finds.
    checked_elsewhere: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.checked_elsewhere:
            return value
        return check_storable(value)


class SamplingRequest(Protocol):
    """A job request of either dialect (native, OpenAI chat or completion), as submission
    sees it: the model and adapter it names, what the worker needs to rebuild its prompt,
    and its sampling parameters resolved against the model."""

    @property
    def model(self) -> str | None: ...

    @property
    def lora(self) -> str | None: ...

    def input_record(self) -> dict[str, Any]: ...

    def to_sampling_params(self, spec: ModelSpec) -> SamplingParams: ...
