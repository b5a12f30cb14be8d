"""Reading ahead: ShardedBatches(prefetch=N) hands out the batches and state of prefetch=0, reads them before
they are asked for, raises a read's error at its batch, and stops its threads; eval_batches(prefetch=N) the
same for the validation split; PackedTokens' access modes."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from relora_ds.data import PackedTokens, ShardedBatches, eval_batches, load_manifest, prepare_data

SEQ = 32


class Windows:
    """Window i is [i]; records the indices each get_batch was asked for, and fails on `bad`."""

    def __init__(self, n, bad=None):
        self.n, self.bad, self.asked = n, bad, []
        self.lock = threading.Lock()
        self.reads = threading.Semaphore(0)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i], dtype=torch.long)

    def get_batch(self, indices):
        with self.lock:
            self.asked.append([int(i) for i in indices])
        self.reads.release()
        if self.bad is not None and self.bad in indices:
            raise OSError(f"cannot read window {self.bad}")
        return torch.tensor(np.asarray(indices, dtype=np.int64)[:, None])


def ids(batch):
    return batch[:, 0].tolist()


@pytest.mark.parametrize("drop_last,world,accum,prefetch", [(True, 1, 1, 1), (True, 2, 2, 3), (False, 2, 3, 2),
                                                             (True, 1, 1, 40)])
def test_prefetch_hands_out_the_batches_and_state_of_no_prefetch(drop_last, world, accum, prefetch):
    """Over three epochs of 23 windows (a tail dropped or completed), for each rank: prefetch=40 reads
    ahead across two epoch boundaries."""
    for rank in range(world):
        plain = ShardedBatches(Windows(23), 2, rank=rank, world_size=world, seed=5, drop_last=drop_last,
                               accumulation_steps=accum)
        ahead = ShardedBatches(Windows(23), 2, rank=rank, world_size=world, seed=5, drop_last=drop_last,
                               accumulation_steps=accum, prefetch=prefetch)
        for _ in range(3 * plain.steps_per_epoch + 1):
            assert ids(next(ahead)) == ids(next(plain))
            assert ahead.state_dict() == plain.state_dict()
        assert plain.epoch == 3
        ahead.close()


def test_a_resume_drops_what_was_read_ahead():
    """load_state_dict while batches are read ahead: the batches continue from the loaded state."""
    reference = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=2)
    batches = [ids(next(reference)) for _ in range(12)]
    ahead = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=2, prefetch=3)
    for _ in range(7):
        next(ahead)
    saved = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=2)
    for _ in range(4):
        next(saved)
    ahead.load_state_dict(saved.state_dict())  # back to batch 4, with batches 7.. read ahead
    assert [ids(next(ahead)) for _ in range(8)] == batches[4:12]
    ahead.close()


def test_batches_are_read_before_they_are_asked_for():
    data = Windows(100)
    batches = ShardedBatches(data, 4, rank=0, world_size=1, seed=0, prefetch=2)
    first = ids(next(batches))
    for _ in range(3):  # the first batch and the two after it, read without another next()
        assert data.reads.acquire(timeout=30)
    with data.lock:
        assert data.asked[0] == first and len(data.asked) == 3
    reference = ShardedBatches(Windows(100), 4, rank=0, world_size=1, seed=0)
    next(reference)
    assert sorted(map(tuple, data.asked[1:])) == sorted(tuple(ids(next(reference))) for _ in range(2))
    batches.close()


def test_a_failed_read_is_raised_at_its_batch():
    order = [ids(b) for b, _ in zip(ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=1), range(10))]
    bad = order[5][0]  # the first window of the sixth batch
    batches = ShardedBatches(Windows(40, bad=bad), 4, rank=0, world_size=1, seed=1, prefetch=3)
    assert [ids(next(batches)) for _ in range(5)] == order[:5]  # read ahead, the failing read waits its turn
    with pytest.raises(OSError, match=f"cannot read window {bad}"):
        next(batches)
    batches.close()


def _prefetch_threads(prefix="relora_ds-prefetch"):
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_close_stops_the_threads_and_a_later_batch_starts_them():
    before = len(_prefetch_threads())
    reference = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=3)
    batches = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=3, prefetch=2)
    assert ids(next(batches)) == ids(next(reference))
    assert len(_prefetch_threads()) > before
    batches.close()
    assert len(_prefetch_threads()) == before
    assert ids(next(batches)) == ids(next(reference))  # on from where it was
    batches.close()


@pytest.mark.parametrize("prefetch", [-1, 1.5, True, "2"])
def test_prefetch_must_be_a_non_negative_int(prefetch):
    with pytest.raises(ValueError, match=f"prefetch={prefetch!r} must be a non-negative int"):
        ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=3, prefetch=prefetch)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(None, tmp_path_factory.mktemp("data"), vocab_size=500, max_docs=100, val_fraction=0.05)


def test_every_access_mode_reads_the_same_windows_and_pickles(data_dir):
    m = load_manifest(data_dir)
    tokens = np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).astype(np.int64)
    idx = np.array([3, 0, 41, 7])
    expected = np.stack([tokens[i * SEQ:i * SEQ + SEQ + 1] for i in idx])
    for access in ("random", "normal", "sequential"):
        ds = PackedTokens(data_dir, "train", seq_len=SEQ, access=access)
        np.testing.assert_array_equal(ds.get_batch(idx).numpy(), expected)
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.access == access
        np.testing.assert_array_equal(copy.get_batch(idx).numpy(), expected)
        assert not ds.tokens.flags.writeable


def test_an_unknown_access_mode_is_refused(data_dir):
    with pytest.raises(ValueError, match=r"access='shuffled' is not one of \['normal', 'random', 'sequential'\]"):
        PackedTokens(data_dir, "train", seq_len=SEQ, access="shuffled")


def test_pinning_threads_take_the_device_of_the_thread_that_starts_them(monkeypatch):
    """Each rank pins on its own GPU: a read-ahead thread left on the default device would create a CUDA
    context on GPU 0 for every rank of the node. (Faked: this machine has no accelerator to pin with.)"""
    current = threading.local()
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: getattr(current, "device", 0))
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda i: setattr(current, "device", i))
    pinned_on = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned_on.append(getattr(current, "device", 0)) or t)
    torch.accelerator.set_device_index(3)  # this rank's GPU
    reference = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=4)
    batches = ShardedBatches(Windows(40), 4, rank=0, world_size=1, seed=4, prefetch=2, pin_memory=True)
    assert [ids(next(batches)) for _ in range(5)] == [ids(next(reference)) for _ in range(5)]
    batches.close()
    assert len(pinned_on) >= 5 and set(pinned_on) == {3}


@pytest.mark.parametrize("world,micro,num,prefetch", [(1, 4, None, 1), (2, 4, 10, 3), (3, 2, 23, 2), (2, 5, 7, 20)])
def test_eval_read_ahead_yields_the_batches_of_no_read_ahead(world, micro, num, prefetch):
    """Every rank's batches, the short last one and the empty ones past the end included, in order."""
    empty = 0
    for rank in range(world):
        want = [ids(b) for b in eval_batches(Windows(25), micro, rank, world, num_windows=num)]
        got = list(eval_batches(Windows(25), micro, rank, world, num_windows=num, prefetch=prefetch))
        assert [ids(b) for b in got] == want and all(b.dtype == torch.long and b.ndim == 2 for b in got)
        empty += want.count([])
    assert empty == (num == 10)  # 10 windows on 2 ranks of 4: rank 1's last batch is empty (0 rows)
    assert _prefetch_threads("relora_ds-eval") == []  # exhausted: its threads are gone


def test_eval_batches_are_read_before_they_are_asked_for_and_an_early_exit_stops_the_threads():
    data = Windows(100)
    batches = eval_batches(data, 4, 0, 1, prefetch=3)
    assert ids(next(batches)) == [0, 1, 2, 3]
    for _ in range(4):  # the first batch and the three after it, read without another next()
        assert data.reads.acquire(timeout=30)
    with data.lock:
        assert sorted(data.asked) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert _prefetch_threads("relora_ds-eval")
    batches.close()  # a loop left early (an exception in the forward): the threads stop
    assert _prefetch_threads("relora_ds-eval") == []
    with data.lock:
        assert len(data.asked) == 4  # nothing read after the loop was left, not the rest of the split


def test_an_eval_read_error_is_raised_at_its_batch():
    batches = eval_batches(Windows(40, bad=13), 4, 0, 1, prefetch=4)
    assert [ids(next(batches)) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(OSError, match="cannot read window 13"):
        next(batches)
    assert _prefetch_threads("relora_ds-eval") == []


@pytest.mark.parametrize("prefetch", [-1, 1.5, True, "2"])
def test_eval_prefetch_must_be_a_non_negative_int(prefetch):
    with pytest.raises(ValueError, match=f"prefetch={prefetch!r} must be a non-negative int"):
        next(eval_batches(Windows(40), 4, 0, 1, prefetch=prefetch))


def test_each_access_mode_advises_the_kernel_of_its_read_pattern(data_dir, monkeypatch):
    """The access mode is the madvise the mapping gets (what makes shuffled reads of evicted windows fast): a
    recording mmap stands in for mmap.mmap (Linux: madvise is there)."""
    import mmap

    advised = []

    class Recording(mmap.mmap):
        def madvise(self, option, *args):
            advised.append(option)
            return super().madvise(option, *args)

    monkeypatch.setattr(mmap, "mmap", Recording)
    for access, option in (("random", mmap.MADV_RANDOM), ("sequential", mmap.MADV_SEQUENTIAL),
                           ("normal", mmap.MADV_NORMAL)):
        advised.clear()
        PackedTokens(data_dir, "train", seq_len=SEQ, access=access).tokens
        assert advised == [option], access


def test_an_empty_split_reads_as_no_windows(tmp_path):
    """A split of 0 tokens (an empty validation split) opens, holds no window, and an empty batch of it is a
    (0, seq_len + 1) LongTensor (an empty file cannot be memory-mapped: nothing is mapped)."""
    from trainer_utils import packed_data_dir

    ds = PackedTokens(packed_data_dir(tmp_path / "d", 100, 0), "validation", seq_len=SEQ)
    assert len(ds) == 0 and ds.tokens.size == 0
    batch = ds.get_batch([])
    assert batch.shape == (0, SEQ + 1) and batch.dtype == torch.long
    with pytest.raises(IndexError, match=r"window 0 out of range for 0 windows \(validation, seq_len=32\)"):
        ds[0]
