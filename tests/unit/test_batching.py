from worker.engine.batching import plan_groups, select_batch

# (prompt tokens, max tokens)
JOBS = [(100, 50), (400, 50), (110, 50), (90, 50), (380, 50), (105, 50), (500, 200)]


def prompt(job: tuple[int, int]) -> int:
    return job[0]


def budget(job: tuple[int, int]) -> int:
    return job[1]


def test_the_first_job_always_goes_with_its_nearest_neighbours() -> None:
    batch = select_batch(JOBS, prompt, budget, max_batch_size=4, max_batch_tokens=10_000)
    # Nearest first; at equal distance (90 and 110), the older job.
    assert batch == [(100, 50), (105, 50), (110, 50), (90, 50)]


def test_the_token_budget_counts_the_padded_cache() -> None:
    batch = select_batch(JOBS, prompt, budget, max_batch_size=10, max_batch_tokens=640)
    # Four rows of (110 + 50) fit in 640; a fifth row, or a longer one, does not.
    assert batch == [(100, 50), (105, 50), (110, 50), (90, 50)]
    long_one = [(100, 50), (30000, 50), *[(100, 50)] * 6]
    batch = select_batch(long_one, prompt, budget, max_batch_size=10, max_batch_tokens=65536)
    assert (30000, 50) not in batch and len(batch) == 7
    # A first job over the budget alone still runs, alone.
    assert select_batch([(500, 200), (10, 10)], prompt, budget, 10, 100) == [(500, 200)]


def test_groups_are_sorted_and_split_where_padding_grows() -> None:
    groups = plan_groups(JOBS, prompt, max_padding=0.5, min_rows=4)
    assert [[p for p, _ in group] for group in groups] == [[90, 100, 105, 110], [380, 400, 500]]
    assert plan_groups(JOBS[:3], prompt, max_padding=0.5, min_rows=4) == [
        [(100, 50), (110, 50), (400, 50)]
    ]
    # Below min_rows a group is never split, however uneven.
    assert len(plan_groups(JOBS, prompt, max_padding=0.5, min_rows=8)) == 1


def test_nothing_in_nothing_out() -> None:
    assert select_batch([], prompt, budget, 4, 100) == []
    assert plan_groups([], prompt, 0.5) == []
