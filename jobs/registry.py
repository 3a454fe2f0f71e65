"""The served models: one entry each, reachable by its registry name or any alias."""

from dataclasses import dataclass
from decimal import Decimal

from jobs.errors import InvalidParameter


@dataclass(frozen=True)
class Architecture:
    """The shapes an adapter must fit, known without loading any weights."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer a LoRA adapter may target."""
        attention, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, attention),
            "k_proj": (self.hidden_size, kv),
            "v_proj": (self.hidden_size, kv),
            "o_proj": (attention, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }


MISTRAL_7B = Architecture()
TINY = Architecture(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str  # a Hugging Face id; a local folder in `models_dir` takes precedence
    context_length: int
    price_input_per_million: Decimal
    price_output_per_million: Decimal
    aliases: tuple[str, ...] = ()
    chat_template: str = "mistral-v1"
    allows_lora: bool = True
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    quantization: str | None = None
    builtin: bool = False  # built locally by `mbatch make-tiny-model`, never downloaded
    architecture: Architecture = MISTRAL_7B
    default_temperature: float = 0.6
    default_max_tokens: int = 256

    @property
    def queue(self) -> str:
        return f"mbatch.{self.name}"


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="mistral-7b-instruct-v0.1",
        aliases=("@cf/mistral/mistral-7b-instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"),
        weights="mistralai/Mistral-7B-Instruct-v0.1",
        context_length=8192,
        sliding_window=4096,
        price_input_per_million=Decimal("0.110"),
        price_output_per_million=Decimal("0.190"),
    ),
    ModelSpec(
        name="mistral-7b-instruct-v0.2",
        aliases=("@hf/mistral/mistral-7b-instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2"),
        weights="mistralai/Mistral-7B-Instruct-v0.2",
        context_length=32768,
        rope_theta=1e6,
        price_input_per_million=Decimal("0.110"),
        price_output_per_million=Decimal("0.190"),
    ),
    ModelSpec(
        name="mistral-7b-instruct-v0.1-awq",
        aliases=(
            "@hf/thebloke/mistral-7b-instruct-v0.1-awq",
            "TheBloke/Mistral-7B-Instruct-v0.1-AWQ",
        ),
        weights="TheBloke/Mistral-7B-Instruct-v0.1-AWQ",
        context_length=8192,
        sliding_window=4096,
        allows_lora=False,
        quantization="awq",
        price_input_per_million=Decimal("0.060"),
        price_output_per_million=Decimal("0.100"),
    ),
    ModelSpec(
        name="tiny-random-mistral",
        weights="tiny-random-mistral",
        context_length=4096,
        builtin=True,
        architecture=TINY,
        price_input_per_million=Decimal("0.100"),
        price_output_per_million=Decimal("0.200"),
    ),
)

_BY_NAME: dict[str, ModelSpec] = {
    key.lower(): spec for spec in MODELS for key in (spec.name, *spec.aliases)
}


def resolve_model(name: str, param: str = "model") -> ModelSpec:
    """The registry entry for a name or alias (case-insensitive); `InvalidParameter` otherwise."""
    spec = _BY_NAME.get(name.strip().lower())
    if spec is None:
        known = ", ".join(spec.name for spec in MODELS)
        raise InvalidParameter(param, name, f"unknown model; served models are {known}")
    return spec
