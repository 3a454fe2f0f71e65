"""Cost of a job from its token counts and the model's price table, in exact decimals."""

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from jobs.registry import ModelSpec

MILLION = Decimal(1_000_000)
# Ten decimal places: a single token of the cheapest model still shows up.
QUANTUM = Decimal("0.0000000001")


@dataclass(frozen=True)
class Cost:
    currency: str
    input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.output


def price(spec: ModelSpec, prompt_tokens: int, completion_tokens: int) -> Cost:
    cost_in = spec.price_input_per_million * prompt_tokens / MILLION
    cost_out = spec.price_output_per_million * completion_tokens / MILLION
    return Cost(
        currency="USD",
        input=cost_in.quantize(QUANTUM, rounding=ROUND_HALF_UP),
        output=cost_out.quantize(QUANTUM, rounding=ROUND_HALF_UP),
    )
