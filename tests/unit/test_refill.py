"""Rows joining a running batch: from the waiting rows and from `refill`, into freed slots."""

import random
from collections.abc import Hashable, Sequence
from pathlib import Path

import pytest

from jobs.registry import resolve_model
from jobs.sampling import SamplingParams
from jobs.settings import Settings
from tests.unit.test_engine import hf_greedy, random_prompt
from worker.engine.decode import Generation, NewRow, decode_rows, generate
from worker.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-random-mistral"), Settings(models_dir=models_dir))


def mixed_rows(loaded: LoadedModel, count: int, seed: int) -> list[NewRow]:
    """Rows of mixed lengths: plain greedy ones (as HF `generate` runs them), and seeded ones
    with filters and penalties."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        greedy = index % 2 == 0
        params = SamplingParams(
            max_tokens=rng.randint(1, 20),
            temperature=0 if greedy else rng.choice([0.7, 1.1]),
            top_p=rng.choice([1.0, 0.8]),
            top_k=rng.choice([0, 20]),
            repetition_penalty=1.0 if greedy else rng.choice([1.0, 1.2]),
            frequency_penalty=0.0 if greedy else rng.choice([0.0, 0.4]),
            seed=None if greedy else rng.randint(1, 10**6),
        )
        rows.append(NewRow(f"row-{index}", random_prompt(loaded, rng, 40), params))
    return rows


class Recorder:
    """The results in the order rows finish, and the refills asked for."""

    def __init__(self, queue: Sequence[NewRow] = ()) -> None:
        self.finished: list[tuple[Hashable, Generation]] = []
        self.queue = list(queue)
        self.asked: list[int] = []

    def on_finish(self, key: Hashable, generation: Generation) -> None:
        self.finished.append((key, generation))

    def refill(self, free: int) -> list[NewRow]:
        self.asked.append(free)
        taken, self.queue = self.queue[:free], self.queue[free:]
        return taken

    @property
    def results(self) -> dict[Hashable, Generation]:
        return dict(self.finished)


def test_rows_joining_mid_batch_match_generate_and_themselves_alone(loaded: LoadedModel) -> None:
    rows = mixed_rows(loaded, 12, seed=4)
    recorder = Recorder(rows[5:])
    decode_rows(loaded, rows[:5], recorder.on_finish, slots=3, refill=recorder.refill)
    results = recorder.results
    assert sorted(map(str, results)) == sorted(str(row.key) for row in rows)
    assert len(recorder.finished) == len(rows)  # each row reported once
    for row in rows:
        got = results[row.key]
        if row.params.greedy:
            assert got.token_ids == hf_greedy(loaded, list(row.prompt), row.params.max_tokens)
        else:
            alone = generate(loaded, [list(row.prompt)], [row.params])[0]
            assert got.token_ids == alone.token_ids, row.key
        assert got.finish_reason == "length" and len(got.token_ids) == row.params.max_tokens


def test_results_come_as_rows_finish_and_the_batch_ends_with_every_slot_free(
    loaded: LoadedModel,
) -> None:
    rng = random.Random(9)
    lengths = [40, 2, 3, 10, 4]
    rows = [
        NewRow(index, random_prompt(loaded, rng, 20), SamplingParams(max_tokens=n, temperature=0))
        for index, n in enumerate(lengths)
    ]
    recorder = Recorder(rows[2:])
    decode_rows(loaded, rows[:2], recorder.on_finish, slots=2, refill=recorder.refill)
    order = [key for key, _ in recorder.finished]
    # The short rows finish, one after the other in the same slot, while row 0 decodes.
    assert order == [1, 2, 3, 4, 0]
    # Asked only for free slots; the last time with the whole batch free, when nothing came.
    assert all(1 <= free <= 2 for free in recorder.asked)
    assert recorder.asked[-1] == 2 and not recorder.queue


def test_waiting_rows_beyond_the_slots_take_their_turn(loaded: LoadedModel) -> None:
    rows = mixed_rows(loaded, 7, seed=12)
    recorder = Recorder()
    decode_rows(loaded, rows, recorder.on_finish, slots=2)
    whole = generate(loaded, [list(r.prompt) for r in rows], [r.params for r in rows])
    results = recorder.results
    assert [results[row.key].token_ids for row in rows] == [g.token_ids for g in whole]


def test_a_dropped_row_leaves_and_a_refilled_one_takes_its_slot(loaded: LoadedModel) -> None:
    rows = mixed_rows(loaded, 4, seed=21)
    long_rows = [
        NewRow(row.key, row.prompt, SamplingParams(max_tokens=16, temperature=0)) for row in rows
    ]
    recorder = Recorder(long_rows[2:])
    calls = 0

    def dropped() -> list[Hashable]:
        nonlocal calls
        calls += 1
        return ["row-0"] if calls >= 4 else []

    decode_rows(
        loaded,
        long_rows[:2],
        recorder.on_finish,
        slots=2,
        refill=recorder.refill,
        dropped=dropped,
    )
    results = recorder.results
    assert results["row-0"].finish_reason == "cancelled" and len(results["row-0"].token_ids) == 4
    for row in long_rows[1:]:
        assert results[row.key].token_ids == hf_greedy(loaded, list(row.prompt), 16), row.key


def test_rows_join_a_prefill_budget_at_a_time_with_steps_between(loaded: LoadedModel) -> None:
    """A wave of rows joins a prompt-token budget at a time, the running rows stepping
    between two prefills; each row's tokens are those it has alone."""
    rng = random.Random(5)
    rows = [
        NewRow(
            f"wave-{i}",
            random_prompt(loaded, rng, 20),
            # Greedy and seeded rows: what each draws does not depend on its batch mates.
            SamplingParams(max_tokens=6, temperature=0 if i % 2 else 0.8, seed=i + 1),
        )
        for i in range(6)
    ]
    budget = max(len(row.prompt) for row in rows)  # one row a prefill, or two short ones

    def run(prefill_tokens: int | None) -> tuple[list[int], dict[Hashable, Generation]]:
        steps: list[int] = []
        recorder = Recorder()
        decode_rows(
            loaded,
            rows,
            recorder.on_finish,
            slots=len(rows),
            on_step=lambda count, _seconds: steps.append(count),
            prefill_tokens=prefill_tokens,
        )
        return steps, recorder.results

    whole_steps, whole = run(None)
    chunked_steps, chunked = run(budget)
    assert whole_steps[0] == len(rows)  # every row prefilled before the first step
    assert chunked_steps[0] < len(rows)  # the first rows step while the others join
    assert max(chunked_steps) <= len(rows)
    for row in rows:
        assert chunked[row.key].token_ids == whole[row.key].token_ids


def test_a_row_refilled_while_a_wave_joins_goes_ahead_of_it(loaded: LoadedModel) -> None:
    """While a wave of rows joins a prefill budget at a time, the refill is asked for the
    slots the wave does not take, and what it gives (an interactive job) joins next."""
    rng = random.Random(9)

    def row(key: str, max_tokens: int) -> NewRow:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        return NewRow(key, random_prompt(loaded, rng, 20), params, stream=True)

    wave = [row(f"wave-{i}", 12) for i in range(6)]
    recorder = Recorder([row("urgent", 4)])
    seen: dict[Hashable, int] = {}  # the loop iteration at which each row was first decoding
    iterations = 0

    def on_tokens(streaming: list[tuple[Hashable, Sequence[int]]]) -> None:
        nonlocal iterations
        iterations += 1
        for key, _tokens in streaming:
            seen.setdefault(key, iterations)

    decode_rows(
        loaded,
        wave,
        recorder.on_finish,
        slots=8,
        refill=recorder.refill,
        on_tokens=on_tokens,
        prefill_tokens=1,  # one row a prefill
    )
    assert recorder.asked[0] == 2  # the slots the wave does not take, asked at once
    assert seen["urgent"] < seen["wave-5"]
    assert set(recorder.results) == {"urgent", *(r.key for r in wave)}
