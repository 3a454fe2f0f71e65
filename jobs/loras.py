"""LoRA adapters: checked on upload (never at run time), stored with their sha256.

The checks read the safetensors header and the PEFT config as data: nothing uploaded is ever
unpickled or executed, and no weights are loaded.
"""

import hashlib
import json
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import InvalidParameter, NotFound
from jobs.models import LoraAdapter
from jobs.registry import ModelSpec, resolve_model
from jobs.storage import Storage

CONFIG_FIELD = "adapter_config.json"
WEIGHTS_FIELD = "adapter_model.safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
TENSOR_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
}


UNSUPPORTED_OPTIONS = (
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "layers_to_transform",
    "layer_replication",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "lora_bias",
)


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    target_modules: list[str]


def parse_config(data: bytes, spec: ModelSpec, max_rank: int) -> AdapterConfig:
    """A PEFT LoRA config whose rank and target modules this model can serve."""
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParameter(CONFIG_FIELD, "...", f"not JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidParameter(CONFIG_FIELD, "...", 'not a PEFT LoRA config ("peft_type": "LORA")')
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidParameter(f"{CONFIG_FIELD}.r", rank, "must be a positive integer")
    if rank > max_rank:
        raise InvalidParameter(f"{CONFIG_FIELD}.r", rank, f"rank is at most {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidParameter(f"{CONFIG_FIELD}.lora_alpha", alpha, "must be a number")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidParameter(f"{CONFIG_FIELD}.target_modules", targets, "must list module names")
    known = spec.architecture.projection_shapes()
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise InvalidParameter(
            f"{CONFIG_FIELD}.target_modules",
            unknown,
            f"{spec.name} has no such modules; it has {', '.join(known)}",
        )
    # Served with rank, alpha and target modules alone: anything that would change what
    # those mean, or the base model itself, is refused rather than silently ignored.
    for unsupported in UNSUPPORTED_OPTIONS:
        if config.get(unsupported):
            raise InvalidParameter(
                f"{CONFIG_FIELD}.{unsupported}", config[unsupported], "not supported"
            )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init != "gaussian":
        raise InvalidParameter(
            f"{CONFIG_FIELD}.init_lora_weights",
            init,
            "adapters that rewrite the base weights (PiSSA, OLoRA, LoftQ...) are not supported",
        )
    return AdapterConfig(rank=rank, alpha=float(alpha), target_modules=sorted(set(targets)))


def read_safetensors_header(stream: BinaryIO, size: int) -> dict[str, Any]:
    """The tensor table of a safetensors file, checked against the file's size."""
    refuse = InvalidParameter(WEIGHTS_FIELD, "...", "not a safetensors file")
    head = stream.read(8)
    if len(head) < 8:
        raise refuse
    (header_bytes,) = struct.unpack("<Q", head)
    if header_bytes > min(MAX_HEADER_BYTES, size - 8):
        raise refuse
    try:
        header = json.loads(stream.read(header_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse from None
    if not isinstance(header, dict):
        raise refuse
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_bytes
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise InvalidParameter(
                WEIGHTS_FIELD, name, "a tensor entry is malformed or of an unsupported dtype"
            ) from None
        if not 0 <= start <= end <= data_bytes or end - start != count * width:
            raise InvalidParameter(WEIGHTS_FIELD, name, "tensor data does not match the header")
    return header


def check_tensors(header: dict[str, Any], spec: ModelSpec, config: AdapterConfig) -> None:
    """Every tensor is a LoRA A or B matrix of a targeted module that fits the base model."""
    shapes = spec.architecture.projection_shapes()
    if not header:
        raise InvalidParameter(WEIGHTS_FIELD, "...", "the file holds no tensors")
    parts: dict[str, set[str]] = {}
    for name, entry in header.items():
        match = TENSOR_NAME.match(name)
        if match is None:
            raise InvalidParameter(WEIGHTS_FIELD, name, "not a LoRA weight of a Mistral layer")
        layer, parent, module, part = int(match[1]), match[2], match[3], match[4]
        if (
            layer >= spec.architecture.num_layers
            or module not in config.target_modules
            or PARENT.get(module, "mlp") != parent
        ):
            raise InvalidParameter(WEIGHTS_FIELD, name, f"{spec.name} has no such target")
        parts.setdefault(name[: -len("A.weight")], set()).add(part)
        in_features, out_features = shapes[module]
        expected = [config.rank, in_features] if part == "A" else [out_features, config.rank]
        if list(entry["shape"]) != expected:
            raise InvalidParameter(
                WEIGHTS_FIELD,
                name,
                f"shape {list(entry['shape'])} does not fit {spec.name}; expected {expected}",
            )
    for prefix, found in parts.items():
        if found != {"A", "B"}:
            raise InvalidParameter(
                WEIGHTS_FIELD, prefix + "*", "a LoRA layer needs both its A and its B matrix"
            )


def _size(stream: BinaryIO) -> int:
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    return size


def _sha256(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(1024 * 1024):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def create_adapter(
    session: Session,
    storage: Storage,
    owner: str,
    name: str,
    base_model: str,
    config_data: bytes,
    weights: BinaryIO,
    max_rank: int,
    max_bytes: int,
) -> LoraAdapter:
    """Check an upload and store it; every refusal names the part that is wrong."""
    spec = resolve_model(base_model, param="base_model")
    if not spec.allows_lora:
        raise InvalidParameter("base_model", base_model, f"{spec.name} does not take LoRA adapters")
    if not 1 <= len(name) <= 128 or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise InvalidParameter("name", name, "1 to 128 letters, digits, '.', '_' or '-'")
    size = _size(weights) + len(config_data)
    if size > max_bytes:
        raise InvalidParameter(
            WEIGHTS_FIELD, f"<{size} bytes>", f"adapters are at most {max_bytes} bytes"
        )
    config = parse_config(config_data, spec, max_rank)
    check_tensors(read_safetensors_header(weights, _size(weights)), spec, config)
    if session.scalar(
        select(LoraAdapter.id).where(LoraAdapter.owner == owner, LoraAdapter.name == name)
    ):
        raise InvalidParameter("name", name, "you already have an adapter of this name")

    adapter_id = "lora_" + secrets.token_hex(12)
    prefix = f"loras/{adapter_id}"
    sha256 = _sha256(weights)
    storage.put_bytes(f"{prefix}/{CONFIG_FIELD}", config_data)
    storage.put_stream(f"{prefix}/{WEIGHTS_FIELD}", weights)
    adapter = LoraAdapter(
        id=adapter_id,
        owner=owner,
        name=name,
        base_model=spec.name,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=config.target_modules,
        size_bytes=size,
        sha256=sha256,
        storage_prefix=prefix,
    )
    session.add(adapter)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise InvalidParameter("name", name, "you already have an adapter of this name") from None
    return adapter


def _owned(session: Session, owner: str, id_or_name: str) -> LoraAdapter | None:
    return session.scalar(
        select(LoraAdapter).where(
            LoraAdapter.owner == owner,
            or_(LoraAdapter.id == id_or_name, LoraAdapter.name == id_or_name),
        )
    )


def find_adapter(session: Session, owner: str, id_or_name: str) -> LoraAdapter:
    adapter = _owned(session, owner, id_or_name)
    if adapter is None:
        raise NotFound(f"no adapter {id_or_name}", param="lora")
    return adapter


def adapter_for_job(session: Session, owner: str, spec: ModelSpec, lora: str) -> LoraAdapter:
    """The adapter a job names: the caller's own, made for the job's model."""
    adapter = _owned(session, owner, lora)
    if adapter is None:
        raise InvalidParameter("lora", lora, "you have no adapter of this id or name")
    if adapter.base_model != spec.name:
        raise InvalidParameter(
            "lora", lora, f"the adapter is for {adapter.base_model}, and this job runs {spec.name}"
        )
    return adapter


def list_adapters(session: Session, owner: str) -> list[LoraAdapter]:
    return list(
        session.scalars(
            select(LoraAdapter).where(LoraAdapter.owner == owner).order_by(LoraAdapter.created_at)
        )
    )


def delete_adapter(session: Session, storage: Storage, adapter: LoraAdapter) -> None:
    session.delete(adapter)
    session.commit()
    for field in (CONFIG_FIELD, WEIGHTS_FIELD):
        storage.delete(f"{adapter.storage_prefix}/{field}")
