"""Cases a seeded fuzzer of the data pipeline found (uninterrupted reads against reads resumed from the saved
sampler state, on ranks of one and two, with accumulation, read-ahead and mixtures): each pinned with stand-in
sources whose rows name their member and window, counted by hand."""
import collections
import json

import numpy as np
import pytest

from relora_ds.data import MixedWindows, ShardedBatches
from trainer_utils import Windows


def rows(batch):
    return [(int(r[0]), int(r[1])) for r in batch]


@pytest.mark.parametrize("sizes, weights", [((10, 10), (0.6, 0.4)), ((1000, 1000), (0.6, 0.4)),
                                            ((7, 13), (0.5, 0.5)), ((50, 51), (0.3, 0.7))])
def test_a_down_weighted_member_reads_no_window_twice_in_an_epoch(sizes, weights):
    """A member with fewer positions per epoch than windows (q < n) walks a stream of shuffles; an epoch that
    ran from the end of one shuffle into the next read up to a quarter of its windows twice (sizes 1000/1000,
    weights 0.6/0.4: 169 of 800 in epoch 2), others not at all. Now: q distinct windows in every epoch, every n
    consecutive windows of the stream a whole shuffle, and a mixture made anew (a resume) maps a late epoch as
    the one that walked there."""
    mix = MixedWindows([Windows(s, n) for s, n in enumerate(sizes)], list(weights), seed=1)
    (m,) = [i for i, (q, n) in enumerate(zip(mix.quotas, sizes)) if q < n]
    q, n = int(mix.quotas[m]), sizes[m]
    stream = []
    for epoch in range(12):
        view = mix.epoch_view(epoch)
        mine = [w for s, w in rows(view.get_batch(np.arange(len(mix)))) if s == m]
        assert len(mine) == len(set(mine)) == q, (epoch, collections.Counter(mine).most_common(2))
        stream += mine
    for c in range(len(stream) // n):
        assert sorted(stream[c * n:(c + 1) * n]) == list(range(n))
    fresh = MixedWindows([Windows(s, n) for s, n in enumerate(sizes)], list(weights), seed=1)
    late = [w for s, w in rows(fresh.epoch_view(11).get_batch(np.arange(len(mix)))) if s == m]
    assert late == stream[11 * q:12 * q]


def test_an_optimizer_step_of_a_mixture_holds_no_window_twice():
    """ShardedBatches promises no sample twice in one step unless the step is larger than the dataset: a step of
    the whole mixture (N = 20, one step per epoch) held a down-weighted member's window twice in most epochs."""
    for seed in range(5):
        mix = MixedWindows([Windows(0, 10), Windows(1, 10)], [0.6, 0.4], seed=seed)
        sampler = ShardedBatches(mix, 10, rank=0, world_size=1, seed=seed, accumulation_steps=2)
        for epoch in range(6):
            step = rows(next(sampler)) + rows(next(sampler))
            counts = collections.Counter(step)
            assert counts[(1, 0)] <= 1 and all(c == 1 for (s, _), c in counts.items() if s == 1), (seed, epoch)
            assert sum(c for (s, _), c in counts.items() if s == 1) == 8  # its quota: 0.4 * 20


@pytest.mark.parametrize("world, micro, accum, cuts", [(2, 5, 1, (3, 17, 40)), (1, 3, 2, (1, 22)),
                                                       (2, 2, 3, (9, 10, 31))])
def test_a_mixture_resumed_at_any_step_reads_the_uninterrupted_batches(world, micro, accum, cuts):
    """The fuzzer's mixture cases, pinned: ranks, accumulation and read-ahead, resumed from the JSON of the saved
    state at the steps `cuts`, hand out the batches of one uninterrupted read; each whole epoch takes each member's
    quota, the down-weighted member's windows at most once."""
    sizes, weights, seed = (37, 23), (0.2, 0.8), 3  # N = 60: member 0 gets 12 of its 37, member 1 48 of 23
    steps = 45

    def sampler(rank, prefetch):
        mix = MixedWindows([Windows(s, n) for s, n in enumerate(sizes)], list(weights), seed=seed)
        return ShardedBatches(mix, micro, rank=rank, world_size=world, seed=seed, accumulation_steps=accum,
                              prefetch=prefetch)

    full = [[rows(b) for b in (lambda s: [next(s) for _ in range(steps * accum)])(sampler(r, 2))]
            for r in range(world)]
    resumed, state = [[] for _ in range(world)], None
    for a, b in zip((0, *cuts), (*cuts, steps)):
        states = []
        for r in range(world):
            s = sampler(r, 0 if r else 1)
            if state is not None:
                s.load_state_dict(json.loads(json.dumps(state)))
            resumed[r] += [rows(next(s)) for _ in range((b - a) * accum)]
            states.append(s.state_dict())
            s.close()
        assert states == [states[0]] * world
        state = states[0]
    assert resumed == full
    per_epoch = 60 // (world * micro * accum) * accum  # micro-steps of an epoch (60 divides by every step here)
    for e in range(steps * accum // per_epoch):
        epoch = collections.Counter(x for r in range(world) for b in full[r][e * per_epoch:(e + 1) * per_epoch]
                                    for x in b)
        assert sum(c for (s, _), c in epoch.items() if s == 0) == 12
        assert all(c == 1 for (s, _), c in epoch.items() if s == 0)
        assert sorted(c for (s, _), c in epoch.items() if s == 1) == [2] * 21 + [3] * 2  # 48 = 2 * 23 + 2
