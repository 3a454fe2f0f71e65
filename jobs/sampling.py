"""The internal sampling parameters that both request dialects convert into.

`SamplingParams.resolve` fills each field in one order (the user's value, then the model's
default, then the built-in default) for both dialects; a request schema applies only what its
own dialect means by a value first. `SamplingParams` checks that the values make sense
together and raises `InvalidParameter` naming the field otherwise.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from jobs.errors import InvalidParameter
from jobs.registry import ModelSpec

MAX_STOP_STRINGS = 4
GREEDY_BELOW = 1e-5
# OpenAI's limit on the alternatives shown per token (chat's `top_logprobs`).
MAX_TOP_LOGPROBS = 20
# The most samples one request may ask for (`n`), each decoded from the same prefill.
MAX_SAMPLES = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0  # 1 (or more) keeps the whole distribution
    top_k: int = 0  # 0 keeps every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # multiplicative, as Hugging Face defines it
    frequency_penalty: float = 0.0  # additive over generated tokens, as OpenAI defines it
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # The model's own log-probability of each generated token, and of its `top_logprobs`
    # best alternatives: reported, never used to sample.
    logprobs: bool = False
    top_logprobs: int = 0
    # The JSON Schema the answer must follow, as canonical JSON text (`jobs.response_format`),
    # enforced while decoding; None: free text.
    response_format: str | None = None
    # How many samples to draw from the one prompt: one prefill, then n rows that decode
    # apart, each with its own seed (`sample_seed`).
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", self.max_tokens, "must be at least 1")
        if self.temperature < 0:
            raise InvalidParameter("temperature", self.temperature, "must be 0 or more")
        if self.top_p < 0:
            raise InvalidParameter("top_p", self.top_p, "must be 0 or more")
        if self.top_k < 0:
            raise InvalidParameter("top_k", self.top_k, "must be 0 or more")
        if not 0 <= self.min_p <= 1:
            raise InvalidParameter("min_p", self.min_p, "must be between 0 and 1")
        if self.repetition_penalty <= 0:
            raise InvalidParameter("repetition_penalty", self.repetition_penalty, "must be > 0")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter("stop", list(self.stop), "at most 4 stop strings")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", list(self.stop), "stop strings must not be empty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(
                "top_logprobs", self.top_logprobs, f"must be between 0 and {MAX_TOP_LOGPROBS}"
            )
        if (
            isinstance(self.n, bool)
            or not isinstance(self.n, int)
            or not 1 <= self.n <= MAX_SAMPLES
        ):
            raise InvalidParameter("n", self.n, f"must be an integer between 1 and {MAX_SAMPLES}")
        if self.top_logprobs and not self.logprobs:
            # As OpenAI: alternatives are only shown beside the chosen tokens' own values.
            raise InvalidParameter("top_logprobs", self.top_logprobs, "needs logprobs: true")

    @classmethod
    def resolve(cls, spec: ModelSpec, **values: Any) -> "SamplingParams":
        """A request's parameters: each field is the user's value where given (not None),
        else the model's default, else the built-in default, as vLLM's
        `SamplingParams.from_optional` does. `stop` may be one string or a list of them."""
        given = {name: value for name, value in values.items() if value is not None}
        if "stop" in given:
            given["stop"] = _stop_strings(given["stop"])
        model_defaults = {
            "max_tokens": spec.default_max_tokens,
            "temperature": spec.default_temperature,
        }
        return cls(**{**model_defaults, **given})

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32: it is greedy.
        return self.temperature < GREEDY_BELOW

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        if self.n == 1:
            # Stored as before n existed: a job's sampling, and its cache key, stay the same.
            del data["n"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        return cls(**{**data, "stop": tuple(data.get("stop") or ())})


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: the seed itself for sample
    0 (so that it decodes as the same request with n=1 does), else splitmix64 of the seed
    advanced by `index` golden-ratio steps, a 64-bit value far from every other sample's."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# The request fields that are sampling parameters: the same names in both dialects.
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def _stop_strings(stop: str | Sequence[str]) -> tuple[str, ...]:
    # Both dialects take one stop string or a list of them.
    return (stop,) if isinstance(stop, str) else tuple(stop)
