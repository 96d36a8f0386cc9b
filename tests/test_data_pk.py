"""P x K logic: runs, groups of K, the shuffle-buffer batcher (no files involved)."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest

from pipeline.data.pk import PASS_END, PKBatcher, Raw, class_runs, cut_groups


def _run(label: int, n: int, url: str = "u") -> list[Raw]:
    return [Raw(f"{label}_{i}", url, label, b"%d" % i) for i in range(n)]


def _endless(class_sizes: dict[int, int]):
    """Class runs of a fake stream: every class once per pass, then PASS_END."""
    while True:
        for label, n in class_sizes.items():
            yield _run(label, n)
        yield PASS_END


def test_class_runs_split_on_label_url_and_pass_end():
    stream = [*_run(1, 2, "a"), *_run(1, 3, "b"), *_run(2, 1, "b"), PASS_END, *_run(2, 2, "b")]
    runs = list(class_runs(stream))
    shapes = [r if r is PASS_END else (r[0].label, r[0].url, len(r)) for r in runs]
    assert shapes == [(1, "a", 2), (1, "b", 3), (2, "b", 1), PASS_END, (2, "b", 2)]


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_cut_groups_against_counting(policy):
    rng = np.random.default_rng(0)
    for n, k in itertools.product(range(1, 14), range(2, 6)):
        run = _run(7, n)
        groups, skipped = cut_groups(run, k, policy, rng)
        assert all(len(g) == k and {r.label for r in g} == {7} for g in groups)
        if n >= k:
            # ceil(n / k) groups of distinct images that together use every image
            assert len(groups) == -(-n // k) and skipped == 0
            assert all(len(set(g)) == k for g in groups)
            assert set().union(*map(set, groups)) == set(run)
            # every image once, except the (k - n % k) % k fillers of the last group
            counts = Counter(r for g in groups for r in g)
            assert sum(counts.values()) - n == (k - n % k) % k
        elif policy == "replace":
            assert len(groups) == 1 and set(groups[0]) == set(run) and skipped == 0
        else:
            assert groups == [] and skipped == n


def _check_batch(batch, p, k):
    assert len(batch) == p
    assert len({g[0].label for g in batch}) == p
    assert all(len(g) == k and len({r.label for r in g}) == 1 for g in batch)


def test_batches_have_p_distinct_classes_and_cover_every_class():
    sizes = {c: 3 + c % 7 for c in range(40)}
    batcher = PKBatcher(
        class_runs(
            itertools.chain.from_iterable(
                (PASS_END,) if r is PASS_END else r for r in _endless(sizes)
            )
        ),
        classes_per_batch=6,
        samples_per_class=3,
        buffer_groups=20,
        small_class_policy="replace",
        rng=np.random.default_rng(1),
    )
    seen = Counter()
    for _ in range(300):
        batch = batcher.next_batch()
        _check_batch(batch, 6, 3)
        seen.update(g[0].label for g in batch)
    assert set(seen) == set(sizes)
    # groups are drawn in proportion to the images a class has (ceil(n / K) groups a pass)
    groups_per_pass = {c: -(-n // 3) for c, n in sizes.items()}
    total = sum(groups_per_pass.values())
    for c in sizes:
        expected = 300 * 6 * groups_per_pass[c] / total
        assert abs(seen[c] - expected) < 0.35 * expected + 5


def test_same_rng_same_batches():
    def batches(seed):
        b = PKBatcher(
            iter(_endless({c: 4 for c in range(10)})),
            classes_per_batch=3,
            samples_per_class=2,
            buffer_groups=5,
            small_class_policy="replace",
            rng=np.random.default_rng(seed),
        )
        return [[r.key for g in b.next_batch() for r in g] for _ in range(20)]

    assert batches(3) == batches(3)
    assert batches(3) != batches(4)


def test_small_classes_replace_or_skip_and_count(caplog):
    sizes = {0: 1, 1: 5, 2: 2, 3: 6, 4: 4, 5: 3}
    for policy in ("replace", "skip"):
        batcher = PKBatcher(
            iter(_endless(sizes)),
            classes_per_batch=2,
            samples_per_class=3,
            buffer_groups=4,
            small_class_policy=policy,
            rng=np.random.default_rng(0),
        )
        with caplog.at_level(logging.WARNING, logger="pipeline.data.pk"):
            labels = Counter(g[0].label for _ in range(60) for g in batcher.next_batch())
        if policy == "replace":
            assert {0, 2} <= set(labels) and batcher.skipped_samples == 0
        else:
            assert not {0, 2} & set(labels)
            # classes 0 and 2 (1 + 2 images) are skipped once per pass read
            assert batcher.skipped_samples == 3 * batcher.skipped_classes // 2 > 0
            assert batcher.passes >= 1
            assert "skipped 3 samples of 2 classes with fewer than K=3" in caplog.text


def test_unfillable_batch_and_empty_pass_are_errors():
    few = PKBatcher(
        iter(_endless({0: 8, 1: 8, 2: 8})),
        classes_per_batch=4,
        samples_per_class=2,
        buffer_groups=4,
        small_class_policy="replace",
        rng=np.random.default_rng(0),
        describe="toy stream",
    )
    with pytest.raises(
        ValueError, match=r"toy stream: its shards hold only 3 distinct classes.*P=4"
    ):
        few.next_batch()
    empty = PKBatcher(
        iter(_endless({0: 1, 1: 2})),
        classes_per_batch=2,
        samples_per_class=3,
        buffer_groups=2,
        small_class_policy="skip",
        rng=np.random.default_rng(0),
    )
    with pytest.raises(ValueError, match=r"whole pass over its shards gave no group of K=3"):
        empty.next_batch()
