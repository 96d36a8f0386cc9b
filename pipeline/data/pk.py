"""Class groups of K and the P x K shuffle-buffer batcher (pure logic: no files, no torch).

The paper's sampler (Brown et al. 2020, Sec. 4) fills every batch with P classes x K images. From
a class-contiguous stream, without random access:

1. consecutive samples of one label within a shard form a *run* (``class_runs``);
2. a run is shuffled and cut into groups of K (``cut_groups``): the last incomplete group is
   completed with other images of the same class, so no image is left out; a run shorter than K
   is padded by sampling with replacement (policy 'replace') or dropped and counted ('skip');
3. groups enter a shuffle buffer; a batch takes P groups of P distinct classes at random
   (``PKBatcher``).

Every random choice comes from one ``numpy.random.Generator`` per stream, consumed in a fixed
order, so a stream is a pure function of its seed and its shard list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)


class Raw(NamedTuple):
    """A sample as read from a shard, not decoded."""

    key: str
    url: str
    label: int
    data: bytes


Group = tuple[Raw, ...]
"""K samples of one class."""


class _PassEnd:
    def __repr__(self) -> str:
        return "PASS_END"


PASS_END = _PassEnd()
"""Marks the end of one complete pass over a stream's shards."""


def class_runs(samples: Iterable[Raw | _PassEnd]) -> Iterator[list[Raw] | _PassEnd]:
    """Cut a sample stream into runs: maximal stretches of one label within one shard."""
    run: list[Raw] = []
    for s in samples:
        if s is PASS_END:
            if run:
                yield run
                run = []
            yield PASS_END
            continue
        if run and (s.label != run[-1].label or s.url != run[-1].url):
            yield run
            run = []
        run.append(s)
    if run:
        yield run


def cut_groups(
    run: list[Raw], k: int, policy: str, rng: np.random.Generator
) -> tuple[list[Group], int]:
    """Shuffle a run of one class and cut it into groups of ``k``; returns (groups, skipped).

    n >= k: n // k groups, plus, when k does not divide n, one group of the n % k leftovers
    completed with distinct other images of the run (every image is used, each group is k
    distinct images). n < k: 'replace' returns one group of the n images padded by sampling
    with replacement; 'skip' returns no group and n skipped samples.
    """
    n = len(run)
    run = [run[i] for i in rng.permutation(n)]
    if n < k:
        if policy == "skip":
            return [], n
        extra = rng.integers(0, n, k - n)
        return [tuple(run) + tuple(run[i] for i in extra)], 0
    full = n - n % k
    groups = [tuple(run[i : i + k]) for i in range(0, full, k)]
    if full < n:
        fill = rng.choice(full, k - (n - full), replace=False)
        groups.append(tuple(run[full:]) + tuple(run[i] for i in fill))
    return groups, 0


class PKBatcher:
    """Draws batches of P groups of P distinct classes from a shuffle buffer of groups.

    ``runs``: an endless iterator of class runs with PASS_END after every complete pass over
    the stream's shards (see ``class_runs``). The buffer is kept at ``buffer_groups`` groups;
    when it holds fewer than P distinct classes more groups are read. Raises ValueError when a
    complete pass adds no group at all or when all classes of a pass together are fewer than P
    (the batch cannot be filled; ``describe`` names the stream in the message).
    """

    def __init__(
        self,
        runs: Iterator[list[Raw] | _PassEnd],
        *,
        classes_per_batch: int,
        samples_per_class: int,
        buffer_groups: int,
        small_class_policy: str,
        rng: np.random.Generator,
        describe: str = "stream",
    ):
        self.runs = runs
        self.p = classes_per_batch
        self.k = samples_per_class
        self.buffer_groups = max(buffer_groups, classes_per_batch)
        self.policy = small_class_policy
        self.rng = rng
        self.describe = describe
        self.buffer: list[Group] = []
        self.passes = 0
        self.skipped_samples = 0
        self.skipped_classes = 0
        self._pass_groups = 0
        self._pass_skipped = [0, 0]

    def _pull(self) -> bool:
        """Read one run into the buffer; False when it was the end of a pass."""
        run = next(self.runs)
        if run is PASS_END:
            self.passes += 1
            if self._pass_skipped[0]:
                # 'skip' policy: counted, and reported once per pass (never silent).
                log.warning(
                    "%s: pass %d skipped %d samples of %d classes with fewer than K=%d images "
                    "(sampler.small_class_policy='skip')",
                    self.describe,
                    self.passes,
                    *self._pass_skipped,
                    self.k,
                )
            if self._pass_groups == 0:
                raise ValueError(
                    f"{self.describe}: a whole pass over its shards gave no group of K="
                    f"{self.k} images of one class (every class has fewer than K images and "
                    "sampler.small_class_policy='skip'); lower sampler.samples_per_class or set "
                    "sampler.small_class_policy='replace'"
                )
            self._pass_groups = 0
            self._pass_skipped = [0, 0]
            return False
        groups, skipped = cut_groups(run, self.k, self.policy, self.rng)
        if skipped:
            self.skipped_samples += skipped
            self.skipped_classes += 1
            self._pass_skipped[0] += skipped
            self._pass_skipped[1] += 1
        self.buffer.extend(groups)
        self._pass_groups += len(groups)
        return True

    def next_batch(self) -> list[Group]:
        """The next P groups (P distinct classes), in random order."""
        while len(self.buffer) < self.buffer_groups:
            self._pull()
        pass_ends = 0
        while True:
            chosen: list[int] = []
            seen: set[int] = set()
            for i in self.rng.permutation(len(self.buffer)):
                label = self.buffer[i][0].label
                if label not in seen:
                    seen.add(label)
                    chosen.append(int(i))
                    if len(chosen) == self.p:
                        break
            if len(chosen) == self.p:
                break
            # Too few distinct classes buffered: read on. After a complete pass read within
            # this attempt (2 pass ends), every class of the stream is in the buffer.
            if not self._pull():
                pass_ends += 1
                if pass_ends >= 2:
                    raise ValueError(
                        f"{self.describe}: its shards hold only {len(seen)} distinct classes "
                        f"with a group of K={self.k} images, but a batch needs P="
                        f"{self.p} distinct classes (sampler.classes_per_batch); lower "
                        "sampler.classes_per_batch, set sampler.small_class_policy='replace', "
                        "or give each stream more classes (more shards, fewer "
                        "sampler.streams_per_rank or fewer ranks)"
                    )
        batch = [self.buffer[i] for i in chosen]
        for i in sorted(chosen, reverse=True):  # O(1) removal: swap with the last, pop
            self.buffer[i] = self.buffer[-1]
            self.buffer.pop()
        return batch
