from decimal import Decimal

from jobs.pricing import price
from jobs.registry import MODELS, resolve_model


def test_cost_is_tokens_times_price_per_million() -> None:
    spec = resolve_model("mistral-7b-instruct-v0.2")
    cost = price(spec, prompt_tokens=1_000_000, completion_tokens=500_000)
    assert cost.input == Decimal("0.11")
    assert cost.output == Decimal("0.095")
    assert cost.total == Decimal("0.205")


def test_one_token_still_costs_something() -> None:
    cost = price(resolve_model("tiny-random-mistral"), prompt_tokens=1, completion_tokens=1)
    assert cost.input == Decimal("0.0000001000")
    assert cost.output == Decimal("0.0000002000")


def test_every_alias_resolves_to_its_entry() -> None:
    assert len(MODELS) == 4
    for spec in MODELS:
        for alias in (spec.name, *spec.aliases, spec.name.upper()):
            assert resolve_model(alias) is spec
    assert resolve_model("@cf/mistral/mistral-7b-instruct-v0.1").sliding_window == 4096
    assert resolve_model("@hf/mistral/mistral-7b-instruct-v0.2").rope_theta == 1e6
    assert not resolve_model("TheBloke/Mistral-7B-Instruct-v0.1-AWQ").allows_lora
