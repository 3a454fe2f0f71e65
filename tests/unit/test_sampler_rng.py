"""The sampler's device-side randomness and host-side flags: seeded rows that repeat whatever
batch they are in, draws that follow the distribution, and a sampling step without host syncs.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from jobs.sampling import SamplingParams
from worker.engine.sampler import SamplingTensors, rng_key, sample, uniforms

CPU = torch.device("cpu")
VOCAB = 6
LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0])
# The host reads a tensor back through these (`.item()`, `bool(tensor)`, `.tolist()`, nonzero).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero"}


def splitmix64(state: int) -> int:
    """The reference generator's next output after `state` (Steele, Lea and Flood)."""
    z = (state + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def test_the_hash_is_splitmix64_in_wrapping_int64() -> None:
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    keys = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF, -0x5555555555555555]
    steps = [0, 1, 2, 1000, 2**40]
    got = uniforms(torch.tensor(keys * len(steps)), torch.tensor(steps).repeat_interleave(7))
    expected = [
        (splitmix64((key + step * 0x9E3779B97F4A7C15) % 2**64) >> 40) / 2**24
        for step in steps
        for key in keys
    ]
    assert got.tolist() == expected
    assert float(got.min()) >= 0 and float(got.max()) < 1


@dataclass
class Row:
    """A row of a simulated decode: its logits at each step depend on its name and step alone,
    and it keeps its own history for the penalties."""

    name: int
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros(VOCAB, dtype=torch.bool))
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(VOCAB, dtype=torch.int32))

    def logits(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.name * 1000 + len(self.tokens))
        return torch.randn(VOCAB, generator=generator) * 2

    def accept(self, token: int) -> None:
        self.tokens.append(token)
        self.seen[token] = True
        self.counts[token] += 1


def step(rows: Sequence[Row], tensors: SamplingTensors) -> None:
    tokens = sample(
        torch.stack([row.logits() for row in rows]),
        torch.stack([row.seen for row in rows]),
        torch.stack([row.counts for row in rows]),
        tensors,
    )
    for row, token in zip(rows, tokens.tolist(), strict=True):
        row.accept(token)


SEEDED = SamplingParams(temperature=1.0, seed=7)
# Batch mates that set every flag between them.
MATES = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, top_k=3, seed=1),
    SamplingParams(temperature=1.3, top_p=0.7, min_p=0.05),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4),
    SamplingParams(temperature=1.1, presence_penalty=0.8, seed=99),
]
STEPS = 24


def run_alone(params: SamplingParams, steps: int = STEPS) -> list[int]:
    row = Row(0, params)
    tensors = SamplingTensors.from_params([params], VOCAB, CPU)
    for _ in range(steps):
        step([row], tensors)
    return row.tokens


def test_a_seeded_row_gives_the_same_tokens_in_any_batch_and_any_slot() -> None:
    alone = run_alone(SEEDED)
    assert len(set(alone)) > 2  # it does draw
    for position in (0, 2, 5):
        rows = [Row(n + 1, p) for n, p in enumerate(MATES)]
        rows.insert(position, Row(0, SEEDED))
        tensors = SamplingTensors.from_params([r.params for r in rows], VOCAB, CPU)
        flags = tensors.flags
        assert flags.any_top_k and flags.any_top_p and flags.any_min_p  # the mates set all
        assert flags.any_repetition_penalty and flags.any_additive_penalty
        for _ in range(STEPS):
            step(rows, tensors)
        assert rows[position].tokens == alone


def test_a_seeded_row_repeats_when_it_joins_late_and_when_mates_leave() -> None:
    alone = run_alone(SEEDED)
    # Fixed slots: the row is assigned to slot 3 after 5 steps; a mate's slot empties later.
    slots: list[Row | None] = [Row(n + 1, p) for n, p in enumerate(MATES)]
    tensors = SamplingTensors.from_params(MATES, VOCAB, CPU)
    for number in range(STEPS + 5):
        if number == 5:
            slots[3] = Row(0, SEEDED)
            tensors.assign([3], [SEEDED])
        if number == 9:
            slots[1] = None
            tensors.assign([1], [None])
        step([r if r is not None else Row(-1, MATES[0]) for r in slots], tensors)
    joined = slots[3]
    assert joined is not None and joined.tokens == alone

    # A growing and shrinking batch: the row joins with `concat`, then mates before it leave
    # with `select`, which moves it to another row.
    rows = [Row(n + 1, p) for n, p in enumerate(MATES)]
    tensors = SamplingTensors.from_params(MATES, VOCAB, CPU)
    for number in range(STEPS + 4):
        if number == 4:
            rows.append(Row(0, SEEDED))
            tensors = tensors.concat(SamplingTensors.from_params([SEEDED], VOCAB, CPU))
        if number == 9:
            keep = [0, 2, 5, 4]
            rows, tensors = [rows[i] for i in keep], tensors.select(keep)
        step(rows, tensors)
    assert rows[2].name == 0 and rows[2].tokens == alone


def test_different_seeds_draw_differently_and_unseeded_rows_each_get_their_own() -> None:
    seeded = {seed: run_alone(SamplingParams(temperature=1.0, seed=seed)) for seed in range(8)}
    assert len({tuple(tokens) for tokens in seeded.values()}) == 8
    unseeded = SamplingTensors.from_params([SamplingParams(temperature=1.0)] * 8, VOCAB, CPU)
    assert len(set(unseeded.rng_key.tolist())) == 8


def test_any_int_is_a_seed_reduced_modulo_2_to_the_64() -> None:
    for seed in (2**200 + 3, -1, -(2**70), 2**64 - 1, 9_999_999_999):
        tokens = run_alone(SamplingParams(temperature=1.0, seed=seed), steps=8)
        assert tokens == run_alone(SamplingParams(temperature=1.0, seed=seed % 2**64), steps=8)
    assert rng_key(2**64 + 5) == rng_key(5) and rng_key(-1) == rng_key(2**64 - 1)
    assert rng_key(5) != rng_key(6)


def chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(draws, minlength=len(probs)).double()
    expected = probs.double() * len(draws)
    kept = expected > 0
    assert int(observed[~kept].sum()) == 0  # never a token the filters cut
    return float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum())


# The 0.999 quantile of the chi-square distribution, by degrees of freedom.
CHI2_999 = {2: 13.82, 3: 16.27, 5: 20.52}


def test_draws_over_many_steps_follow_the_filtered_distribution() -> None:
    # 32 rows with their own seeds, 200 steps each: the draws of every (row, step) pair.
    cases = [
        (SamplingParams(temperature=0.7), torch.softmax(LOGITS / 0.7, dim=-1), 5),
        (SamplingParams(temperature=1.5, top_k=3), torch.softmax(LOGITS[[0, 1, 4]] / 1.5, -1), 2),
    ]
    for params, probs, freedom in cases:
        rows = [SamplingParams(**{**params.to_dict(), "seed": seed}) for seed in range(32)]
        tensors = SamplingTensors.from_params(rows, VOCAB, CPU)
        logits = LOGITS.repeat(32, 1)
        seen = torch.zeros((32, VOCAB), dtype=torch.bool)
        counts = torch.zeros((32, VOCAB), dtype=torch.int32)
        draws = torch.cat([sample(logits, seen, counts, tensors) for _ in range(200)])
        if len(probs) < VOCAB:  # top_k: the three best tokens, 4, 0 and 1
            probs = torch.zeros(VOCAB).index_put_((torch.tensor([0, 1, 4]),), probs)
        assert chi_square(draws, probs) < CHI2_999[freedom]
        # And a single row's stream over its steps, on its own.
        assert chi_square(draws[::32], probs) < CHI2_999[freedom] * 1.5


def test_a_row_sampled_near_top_p_keeps_to_the_nucleus() -> None:
    # softmax(LOGITS): token 4 holds 0.61, 0 another 0.22: top_p 0.7 keeps exactly those two.
    params = [SamplingParams(temperature=1.0, top_p=0.7, seed=seed) for seed in range(32)]
    tensors = SamplingTensors.from_params(params, VOCAB, CPU)
    seen = torch.zeros((32, VOCAB), dtype=torch.bool)
    counts = torch.zeros((32, VOCAB), dtype=torch.int32)
    draws = torch.cat([sample(LOGITS.repeat(32, 1), seen, counts, tensors) for _ in range(30)])
    full = torch.softmax(LOGITS, dim=-1)
    nucleus = torch.zeros(VOCAB).index_put_(
        (torch.tensor([0, 4]),), full[[0, 4]] / full[[0, 4]].sum()
    )
    assert chi_square(draws, nucleus) < 10.83  # one degree of freedom, 0.999


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((6, 1000), generator=generator)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_p=0.9) for i in range(6)]
    tensors = SamplingTensors.from_params(params, 1000, CPU)
    seen = torch.zeros((6, 1000), dtype=torch.bool)
    tokens = sample(logits, seen, torch.zeros((6, 1000), dtype=torch.int32), tensors)
    assert tokens[1::2].tolist() == logits[1::2].argmax(dim=-1).tolist()
    assert tensors.step.tolist() == [1] * 6


def test_flags_follow_the_rows_that_join_and_leave() -> None:
    tensors = SamplingTensors.from_params([None, SamplingParams(temperature=0)], VOCAB, CPU)
    assert tensors.flags.all_greedy and not tensors.flags.any_top_p
    # top_k at or past the vocabulary cuts nothing; a greedy row's top_p samples nothing.
    tensors.assign([0], [SamplingParams(temperature=1.0, top_k=VOCAB)])
    assert not tensors.flags.all_greedy and not tensors.flags.any_top_k
    tensors.assign([1], [SamplingParams(temperature=0, top_p=0.5, repetition_penalty=1.2)])
    assert not tensors.flags.any_top_p and tensors.flags.any_repetition_penalty
    tensors.assign([0, 1], [SamplingParams(temperature=1.0, top_k=2), None])
    assert tensors.flags.any_top_k and tensors.flags.top_k_max == 2
    assert not tensors.flags.any_repetition_penalty
    assert tensors.select([1]).flags.all_greedy


def test_a_steady_sampled_step_makes_no_host_sync() -> None:
    # The point of the device-side draws: the CPU can queue the next step without waiting.
    batch = [SamplingParams(temperature=0.0)] + MATES + [SEEDED]
    vocab = 512
    tensors = SamplingTensors.from_params(batch, vocab, CPU)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((len(batch), vocab), generator=generator)
    seen = torch.rand((len(batch), vocab), generator=generator) < 0.1
    counts = torch.randint(0, 3, (len(batch), vocab), generator=generator, dtype=torch.int32)
    sample(logits, seen, counts, tensors)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            sample(logits, seen, counts, tensors)
        tensors.assign([2], [SamplingParams(temperature=0.5, top_p=0.5, seed=2**70)])
        tensors = tensors.select([0, 2, 3])
        sample(logits[:3], seen[:3], counts[:3], tensors)
    names = {event.name for event in prof.events()}
    assert "aten::searchsorted" in names  # the profile did see the sampled path
    assert not names & SYNC_OPS, names & SYNC_OPS
