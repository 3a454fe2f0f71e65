"""LoRA adapters: checked on upload (never at run time), stored with their sha256.

The checks read the safetensors header and the PEFT config as data: nothing uploaded is ever
unpickled or executed, and no weights are loaded.
"""

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import InvalidParameter, NotFound
from jobs.models import LoraAdapter
from jobs.registry import ModelSpec, resolve_model
from jobs.safetensors_header import Brief, TensorInfo, loads, read_header
from jobs.storage import Storage

CONFIG_FIELD = "adapter_config.json"
WEIGHTS_FIELD = "adapter_model.safetensors"
# A PEFT config is a kilobyte or so; much more is no config, and parsing it would cost memory.
MAX_CONFIG_BYTES = 1024 * 1024
# The names PEFT gives the weights, exactly: Python's \d and int() also take other scripts'
# digits and leading zeros, which name no layer PEFT would load; six digits keep int() cheap.
TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,5})\.(self_attn|mlp)\.([a-z_]+)"
    r"\.lora_([AB])\.weight",
    re.ASCII,
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


def _alpha(config: dict[str, Any], rank: int) -> float:
    """A positive, finite lora_alpha. NaN or an infinity makes every output garbage, zero makes
    it the base model's and a negative alpha turns the adapter around, yet all those jobs would
    succeed and be billed."""
    if "lora_alpha" not in config:
        return float(rank)
    value = config["lora_alpha"]
    field = f"{CONFIG_FIELD}.lora_alpha"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidParameter(field, Brief(value), "must be a number")
    try:
        alpha = float(value)
    except OverflowError:  # an integer beyond any float
        alpha = math.inf
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidParameter(field, Brief(value), "must be a positive, finite number")
    return alpha


def parse_config(data: bytes, spec: ModelSpec, max_rank: int) -> AdapterConfig:
    """A PEFT LoRA config whose rank and target modules this model can serve."""
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidParameter(
            CONFIG_FIELD, f"<{len(data)} bytes>", f"configs are at most {MAX_CONFIG_BYTES} bytes"
        )
    config = loads(data, CONFIG_FIELD)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidParameter(CONFIG_FIELD, "...", 'not a PEFT LoRA config ("peft_type": "LORA")')
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidParameter(f"{CONFIG_FIELD}.r", Brief(rank), "must be a positive integer")
    if rank > max_rank:
        raise InvalidParameter(f"{CONFIG_FIELD}.r", Brief(rank), f"rank is at most {max_rank}")
    alpha = _alpha(config, rank)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidParameter(
            f"{CONFIG_FIELD}.target_modules", Brief(targets), "must list module names"
        )
    known = spec.architecture.projection_shapes()
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise InvalidParameter(
            f"{CONFIG_FIELD}.target_modules",
            Brief(unknown),
            f"{spec.name} has no such modules; it has {', '.join(known)}",
        )
    # Served with rank, alpha and target modules alone: anything that would change what
    # those mean, or the base model itself, is refused rather than silently ignored.
    for unsupported in UNSUPPORTED_OPTIONS:
        if config.get(unsupported):
            raise InvalidParameter(
                f"{CONFIG_FIELD}.{unsupported}", Brief(config[unsupported]), "not supported"
            )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init != "gaussian":
        raise InvalidParameter(
            f"{CONFIG_FIELD}.init_lora_weights",
            Brief(init),
            "adapters that rewrite the base weights (PiSSA, OLoRA, LoftQ...) are not supported",
        )
    return AdapterConfig(rank=rank, alpha=alpha, target_modules=sorted(set(targets)))


def check_tensors(tensors: dict[str, TensorInfo], spec: ModelSpec, config: AdapterConfig) -> None:
    """Every tensor is a LoRA A or B matrix of a targeted module that fits the base model."""
    shapes = spec.architecture.projection_shapes()
    if not tensors:
        raise InvalidParameter(WEIGHTS_FIELD, "...", "the file holds no tensors")
    parts: dict[str, set[str]] = {}
    for name, info in tensors.items():
        match = TENSOR_NAME.fullmatch(name)
        if match is None:
            raise InvalidParameter(
                WEIGHTS_FIELD, Brief(name), "not a LoRA weight of a Mistral layer"
            )
        layer, parent, module, part = int(match[1]), match[2], match[3], match[4]
        if (
            layer >= spec.architecture.num_layers
            or module not in config.target_modules
            or PARENT.get(module, "mlp") != parent
        ):
            raise InvalidParameter(WEIGHTS_FIELD, Brief(name), f"{spec.name} has no such target")
        parts.setdefault(name[: -len("A.weight")], set()).add(part)
        in_features, out_features = shapes[module]
        expected = (config.rank, in_features) if part == "A" else (out_features, config.rank)
        if info.shape != expected:
            raise InvalidParameter(
                WEIGHTS_FIELD,
                Brief(name),
                f"shape {Brief(list(info.shape))} does not fit {spec.name}; "
                f"expected {list(expected)}",
            )
    for prefix, found in parts.items():
        if found != {"A", "B"}:
            raise InvalidParameter(
                WEIGHTS_FIELD, Brief(prefix + "*"), "a LoRA layer needs both its A and its B matrix"
            )


def _object_key(prefix: str, field: str) -> str:
    """Where one of an adapter's files is stored."""
    return f"{prefix}/{field}"


def weights_key(adapter: LoraAdapter) -> str:
    """Where an adapter's weights are stored."""
    return _object_key(adapter.storage_prefix, WEIGHTS_FIELD)


def weights_match(adapter: LoraAdapter, data: bytes) -> bool:
    """The weights read back are those whose sha256 was recorded on upload."""
    return hashlib.sha256(data).hexdigest() == adapter.sha256


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
    check_tensors(read_header(weights, _size(weights), WEIGHTS_FIELD), spec, config)
    if session.scalar(
        select(LoraAdapter.id).where(LoraAdapter.owner == owner, LoraAdapter.name == name)
    ):
        raise InvalidParameter("name", name, "you already have an adapter of this name")

    adapter_id = "lora_" + secrets.token_hex(12)
    prefix = f"loras/{adapter_id}"
    sha256 = _sha256(weights)
    storage.put_bytes(_object_key(prefix, CONFIG_FIELD), config_data)
    storage.put_stream(_object_key(prefix, WEIGHTS_FIELD), weights)
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
    try:
        with session.begin_nested():  # the name's uniqueness, without losing the unit of work
            session.add(adapter)
    except IntegrityError:
        raise InvalidParameter("name", name, "you already have an adapter of this name") from None
    return adapter


def _owned(session: Session, owner: str, id_or_name: str) -> LoraAdapter | None:
    return session.scalar(
        select(LoraAdapter).where(
            LoraAdapter.owner == owner,
            or_(LoraAdapter.id == id_or_name, LoraAdapter.name == id_or_name),
        )
    )


def get_adapter(session: Session, adapter_id: str) -> LoraAdapter | None:
    """An adapter by its id, whoever owns it (a worker running a job it was checked for)."""
    return session.get(LoraAdapter, adapter_id)


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
    # As files are deleted: the row's delete is flushed, and committed by the unit of work
    # once the objects are gone, so a storage outage leaves both, never an object that no
    # row names.
    session.delete(adapter)
    session.flush()
    for field in (CONFIG_FIELD, WEIGHTS_FIELD):
        storage.delete(_object_key(adapter.storage_prefix, field))
