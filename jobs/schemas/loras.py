"""What the API shows of a LoRA adapter."""

from datetime import datetime

from pydantic import BaseModel

from jobs.models import LoraAdapter
from jobs.timeutil import aware


class LoraPublic(BaseModel):
    id: str
    object: str = "lora"
    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, adapter: LoraAdapter) -> "LoraPublic":
        return cls(
            id=adapter.id,
            name=adapter.name,
            base_model=adapter.base_model,
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=adapter.target_modules,
            size_bytes=adapter.size_bytes,
            sha256=adapter.sha256,
            created_at=aware(adapter.created_at),  # type: ignore[arg-type]
        )


class LoraList(BaseModel):
    object: str = "list"
    data: list[LoraPublic]
