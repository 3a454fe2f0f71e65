"""`response_format` enforced while decoding: random schemas on the tiny random model, whose
answers are noise that the grammar shapes into JSON."""

import json
import random
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from jobs.registry import resolve_model
from jobs.response_format import ANY_OBJECT, schema_text
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from jobs.tokenizer import ChatMessage
from tests.unit.test_logprobs import assert_raw_logprobs
from worker.engine.decode import FAILED, Generation, NewRow, decode_rows, generate
from worker.engine.grammar import ERROR_CODE
from worker.engine.loader import LoadedModel, load_model

MAX_TOKENS = 200
KEYS = ["name", "age", "city", "items", "price", "tags", "id", "score", "active", "kind"]
COLOURS = ["red", "green", "blue", "small", "large", "x", "y z", "ok"]


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "nullable"])
    if kind == "string":
        low = rng.randint(0, 4)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100.5])}
    if kind == "enum":
        return {"enum": rng.sample(COLOURS, rng.randint(2, 5))}
    if kind == "nullable":
        return {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}
    return {"type": "boolean"}


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    if depth <= 0 or rng.random() < 0.5:
        return _leaf(rng)
    if rng.random() < 0.35:
        low = rng.randint(0, 2)
        items = _node(rng, depth - 1)
        return {"type": "array", "items": items, "minItems": low, "maxItems": low + 3}
    return _object(rng, depth - 1)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = rng.sample(KEYS, rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {key: _node(rng, depth) for key in keys},
        "required": [key for key in keys if rng.random() < 0.7],  # nested ones too
        "additionalProperties": False,
    }


def random_schemas(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_object(rng, rng.randint(1, 3)) for _ in range(count)]


def prompt(loaded: LoadedModel, rng: random.Random) -> list[int]:
    words = ["give", "me", "some", "json", "about", "cats", "and", "dogs", "please"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
    return loaded.tokenizer.encode_chat([ChatMessage("user", text)])


def constrained(schema: dict[str, Any], seed: int, **values: Any) -> SamplingParams:
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    values = {"max_tokens": MAX_TOKENS, "temperature": 1.0, **values}
    return SamplingParams(seed=seed, response_format=schema_text(response_format), **values)


def decode_all(loaded: LoadedModel, rows: list[NewRow], slots: int) -> dict[Hashable, Generation]:
    results: dict[Hashable, Generation] = {}
    waiting = list(rows)

    def refill(free: int) -> list[NewRow]:
        taken, waiting[:] = waiting[:free], waiting[free:]
        return taken

    decode_rows(loaded, [], results.__setitem__, slots=slots, refill=refill)
    return results


def test_random_schemas_give_json_that_validates(loaded: LoadedModel) -> None:
    rng = random.Random(7)
    schemas = random_schemas(100, seed=1)
    rows = []
    for index, schema in enumerate(schemas):
        rows.append(NewRow(("json", index), prompt(loaded, rng), constrained(schema, index + 1)))
        if index % 4 == 0:  # free rows between them, in the same steps
            free = SamplingParams(max_tokens=rng.randint(5, 60), temperature=1.0, seed=index)
            rows.append(NewRow(("free", index), prompt(loaded, rng), free))
    results = decode_all(loaded, rows, slots=32)
    stopped = lengths = 0
    for index, schema in enumerate(schemas):
        result = results[("json", index)]
        assert result.finish_reason in ("stop", "length"), result.error
        if result.finish_reason == "length":
            lengths += 1
            assert len(result.token_ids) == MAX_TOKENS
            continue
        stopped += 1
        jsonschema.validate(json.loads(result.text), schema)
    print(f"{stopped} answers finished stop and validate; {lengths} reached {MAX_TOKENS} tokens")
    assert lengths < len(schemas) / 2


def test_free_rows_beside_constrained_ones_give_what_they_give_alone(loaded: LoadedModel) -> None:
    rng = random.Random(3)
    schemas = random_schemas(6, seed=2)
    free_params = [SamplingParams(max_tokens=30, temperature=1.0, seed=50 + i) for i in range(4)]
    free_prompts = [prompt(loaded, rng) for _ in free_params]
    json_prompts = [prompt(loaded, rng) for _ in schemas]
    mixed = generate(
        loaded,
        free_prompts + json_prompts,
        free_params + [constrained(schema, 10 + i) for i, schema in enumerate(schemas)],
    )
    for index, params in enumerate(free_params):
        alone = generate(loaded, [free_prompts[index]], [params])[0]
        assert mixed[index].token_ids == alone.token_ids, index


def test_json_object_gives_an_object(loaded: LoadedModel) -> None:
    rng = random.Random(4)
    json_object = schema_text({"type": "json_object"})
    assert json_object == json.dumps(ANY_OBJECT, separators=(",", ":"))
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, response_format=json_object
        )
        for seed in range(1, 9)
    ]
    results = generate(loaded, [prompt(loaded, rng) for _ in params], params)
    finished = [result for result in results if result.finish_reason == "stop"]
    assert finished
    for result in finished:
        assert isinstance(json.loads(result.text), dict)
    for result in results:  # even one cut short is the start of an object
        assert result.text.startswith("{")


def test_a_schema_that_does_not_compile_fails_its_row_alone(loaded: LoadedModel) -> None:
    rng = random.Random(5)
    # Valid JSON Schema, which the API lets through, but a reference the worker cannot follow.
    broken = json.dumps({"$ref": "https://example.com/elsewhere.json"})
    params = [
        SamplingParams(max_tokens=8, temperature=0),
        SamplingParams(max_tokens=8, temperature=0, response_format=broken),
        constrained({"type": "object", "properties": {"a": {"type": "boolean"}}}, 1),
    ]
    results = generate(loaded, [prompt(loaded, rng) for _ in params], params)
    assert results[1].finish_reason == FAILED
    assert results[1].error is not None and results[1].error.startswith(f"{ERROR_CODE}:")
    assert results[0].finish_reason in ("stop", "length") and results[0].token_ids
    assert results[2].finish_reason in ("stop", "length") and results[2].text.startswith("{")


def test_a_row_that_reaches_max_tokens_before_the_json_closes_ends_length(
    loaded: LoadedModel,
) -> None:
    schema = {
        "type": "object",
        "properties": {key: {"type": "string", "minLength": 5} for key in KEYS},
        "required": KEYS,
        "additionalProperties": False,
    }
    # Ten required keys with their values are well over 20 tokens.
    ids = prompt(loaded, random.Random(6))
    result = generate(loaded, [ids], [constrained(schema, 3, max_tokens=20)])[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 20
    assert result.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_logprobs_of_a_constrained_row_are_the_raw_models(loaded: LoadedModel) -> None:
    ids = prompt(loaded, random.Random(8))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    params = constrained(schema, 4, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    result = generate(loaded, [ids], [params])[0]
    assert_raw_logprobs(loaded, ids, result, top=3)
    assert result.logprobs is not None
    # The mask decided: the raw model's favourite is not the JSON's first token.
    first = result.logprobs[0]
    assert first["top_logprobs"][0]["logprob"] > first["logprob"]
