"""Deterministic, sharded, exactly resumable batches over a window dataset.

The sample order of epoch ``e`` is a permutation of all windows drawn from ``(seed, e)``. Ranks walk it
together: micro-step ``k`` of an epoch covers the global slice ``[k*W*B, (k+1)*W*B)`` of the order
(``W`` ranks, ``B`` micro-batch size), and rank ``r`` takes its ``r``-th block of ``B``. So

- the ranks' shards of an epoch are disjoint, and together they cover it (but for a tail smaller than
  one optimizer step's ``G*W*B`` samples, dropped with ``drop_last=True``, or completed to a whole step
  from the start of the same epoch's order otherwise);
- the set of samples in an optimizer step depends only on the global batch ``G*W*B``, not on how it is
  split into accumulation steps ``G``, ranks ``W`` and micro-batches ``B`` (the epoch's tail is cut or
  completed in whole optimizer steps, so no step straddles two epochs, and no sample is in a step twice
  unless the step is larger than the dataset);
- the whole state is (epoch, global position), the same on every rank.

Changing the world size (or micro-batch size) on resume re-shards by global sample index: the new ranks
continue the same epoch order from the same global position, so no sample is skipped or repeated.

A dataset with an ``epoch_view(epoch)`` method (a mixture of data dirs, relora_ds.data.mixture) is read
through that epoch's view: its positions may name other windows in each epoch. Nothing else changes.

With ``prefetch=N`` background threads read the next N micro-batches while the current step trains (the
reads of shuffled windows not in the page cache wait on storage); the batches, their order and the state
are those of ``prefetch=0``: the state counts only batches handed out.
"""
from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

log = logging.getLogger(__name__)

_STATE_VERSION = 1


def _check_shard(micro_batch_size: int, rank: int, world_size: int) -> None:
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")


def _size(dataset) -> str:
    """A PackedTokens' size for an error: "the train split: 1,989 tokens at seq_len=2048" ("" for others)."""
    tokens, seq_len = getattr(dataset, "num_tokens", None), getattr(dataset, "seq_len", None)
    if tokens is None or seq_len is None:
        return ""
    split = getattr(dataset, "split", None)
    return f"{f'the {split} split: ' if split else ''}{tokens:,} tokens at seq_len={seq_len}"


def _batch(dataset, indices: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
    batch = dataset.get_batch(indices) if hasattr(dataset, "get_batch") else torch.stack([dataset[int(i)]
                                                                                          for i in indices])
    # Page-locked, a batch's copy to the GPU can be asynchronous (.to(device, non_blocking=True)).
    return batch.pin_memory() if pin_memory else batch


def _check_prefetch(prefetch) -> None:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be a non-negative int (micro-batches read ahead; "
                         "0 reads each when it is asked for)")


def _reader_pool(threads: int, pin_memory: bool, name: str) -> ThreadPoolExecutor:
    """Threads that read (and pin) batches. A new thread's current device is the first GPU: pinning there
    would make every rank of a node create a CUDA context on GPU 0. The threads take this thread's device, as
    DataLoader's pinning does."""
    device = torch.accelerator.current_device_index() if pin_memory else None
    return ThreadPoolExecutor(threads, thread_name_prefix=name,
                              initializer=None if device is None else torch.accelerator.set_device_index,
                              initargs=() if device is None else (device,))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(num_samples), a pure function of its args.

    uint32 where it fits: 4 bytes per window (a 20B-token corpus at seq_len 1024 is 80 MB per rank).
    NumPy does not promise Generator streams across releases, so tests pin a few orders: exact resume
    across a NumPy upgrade holds only while they pass.
    """
    order = np.arange(num_samples, dtype=np.uint32 if num_samples < 2**32 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)
    return order


class ShardedBatches:
    """Infinite iterator of this rank's micro-batches, LongTensor (micro_batch_size, seq_len + 1).

    `prefetch`: micro-batches read ahead by as many background threads (0: each is read when asked for).
    `pin_memory`: hand out batches in page-locked memory (needs an accelerator), for asynchronous copies.
    Call :meth:`close` to stop the threads (they also end with the process).
    """

    def __init__(self, dataset, micro_batch_size: int, *, rank: int, world_size: int, seed: int,
                 drop_last: bool = True, accumulation_steps: int = 1, prefetch: int = 0, pin_memory: bool = False):
        _check_shard(micro_batch_size, rank, world_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be a positive int")
        _check_prefetch(prefetch)
        self.num_samples = len(dataset)
        if self.num_samples == 0:
            size = _size(dataset)
            raise ValueError(f"the dataset has no windows{f' ({size})' if size else ''}: each window needs seq_len + 1 "
                             "tokens; use a smaller seq_len, or more data (launch/prepare_data.py)")
        # Samples of one optimizer step: the unit in which an epoch's tail is dropped.
        self.step_samples = accumulation_steps * micro_batch_size * world_size
        if drop_last and self.num_samples < self.step_samples:
            size = _size(dataset)
            raise ValueError(
                f"the dataset has {self.num_samples:,} windows{f' ({size})' if size else ''}, fewer than one "
                f"optimizer step's global batch of accumulation_steps * world_size * micro_batch_size = "
                f"{accumulation_steps} * {world_size} * {micro_batch_size} = {self.step_samples:,}: use a smaller "
                "batch (accumulation_steps, micro_batch_size), a smaller seq_len (more windows from the same "
                "tokens), or more data (launch/prepare_data.py); or pass drop_last=False to ShardedBatches, "
                "which repeats samples to fill each step")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.epoch = 0
        # Global index into this epoch's order of the next micro-step's first sample.
        self.position = 0
        # Optimizer steps start at positions step_offset + k * step_samples of an epoch: 0, but after a resume
        # with another global batch the resumed position (always a step boundary) starts one.
        self.step_offset = 0
        # Samples consumed by all ranks together since the start of training, across epochs.
        self.samples_consumed = 0
        # Epoch orders by epoch (the current one, and the next while prefetching crosses into it), shared with
        # the read-ahead cursor.
        self._orders: dict[int, np.ndarray] = {}
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: ShardedBatches | None = None  # a copy of this sampler's position, `prefetch` batches on
        self._pending: collections.deque[Future] = collections.deque()

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps per epoch (the same on every rank)."""
        steps = self.num_samples // self.step_samples if self.drop_last else -(-self.num_samples // self.step_samples)
        return steps * (self.step_samples // self.global_batch)

    def _epoch_order(self) -> np.ndarray:
        if self.epoch not in self._orders:
            for old in [e for e in self._orders if e < self.epoch - 1]:  # the cursor ahead may be one epoch on
                del self._orders[old]
            self._orders[self.epoch] = epoch_order(self.num_samples, self.seed, self.epoch)
        return self._orders[self.epoch]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def _epoch_dataset(self):
        """What this epoch's indices index: the dataset, or for a mixture its view of the epoch (each epoch
        takes other windows of the members it reads less than once per epoch; relora_ds.data.mixture)."""
        view = getattr(self.dataset, "epoch_view", None)
        return self.dataset if view is None else view(self.epoch)

    def __next__(self) -> torch.Tensor:
        if not self.prefetch:
            indices = self._advance()
            return _batch(self._epoch_dataset(), indices, self.pin_memory)
        if self._pool is None:
            self._pool = _reader_pool(self.prefetch, self.pin_memory, "relora_ds-prefetch")
        if self._ahead is None:  # (re)start reading ahead from this sampler's position
            self._ahead = copy.copy(self)
            self._ahead.prefetch, self._ahead._pending = 0, collections.deque()
        while len(self._pending) <= self.prefetch:  # this batch, and `prefetch` more after it
            indices = self._ahead._advance()
            self._pending.append(self._pool.submit(_batch, self._ahead._epoch_dataset(), indices, self.pin_memory))
        self._advance()  # the same walk as the cursor ahead: this sampler's state counts handed-out batches
        return self._pending.popleft().result()  # a read's error is raised here

    def _advance(self) -> np.ndarray:
        """Move to the next micro-batch: this rank's window indices of it."""
        n, g, step = self.num_samples, self.global_batch, self.step_samples
        at_step_start = (self.position - self.step_offset) % step == 0
        if self.drop_last:
            epoch_done = self.position + g > n or (at_step_start and self.position + step > n)
        else:  # the tail step is completed from the order's start: the next epoch begins with a step
            epoch_done = self.position >= n and at_step_start
        if epoch_done:
            self.epoch += 1
            self.position = 0
            self.step_offset = 0
        order = self._epoch_order()
        start = self.position + self.rank * self.micro_batch_size
        # Without drop_last, the epoch's last optimizer step wraps to the start of the same order.
        indices = order[np.arange(start, start + self.micro_batch_size) % n]
        self.position += g
        self.samples_consumed += g
        return indices

    def _drop_read_ahead(self) -> None:
        for future in self._pending:
            future.cancel()  # one already reading finishes; its batch is dropped
        self._pending.clear()
        self._ahead = None

    def close(self) -> None:
        """Stop the read-ahead threads (waiting for a read in progress); a later batch starts them again."""
        self._drop_read_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def state_dict(self) -> dict:
        """Plain ints and bools (JSON- and pickle-safe), identical on every rank."""
        return {"version": _STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "samples_consumed": self.samples_consumed, "num_samples": self.num_samples,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` left off; a different world size or micro-batch size re-shards."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}")
        for key in ("seed", "num_samples", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler has {key}={state[key]!r}, this one "
                    f"{getattr(self, key)!r} (a different seed, dataset, seq_len or drop_last changes the "
                    f"sample order)")
        if (state["world_size"], state["micro_batch_size"]) != (self.world_size, self.micro_batch_size):
            log.warning("resuming with world_size=%d, micro_batch_size=%d (checkpoint: %d, %d): re-sharding "
                        "epoch %d from global sample %d", self.world_size, self.micro_batch_size,
                        state["world_size"], state["micro_batch_size"], state["epoch"], state["position"])
        self._drop_read_ahead()
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.samples_consumed = int(state["samples_consumed"])
        # A checkpoint is taken between optimizer steps: its position starts one, whatever the global batch.
        self.step_offset = self.position % self.step_samples


def eval_batches(dataset, micro_batch_size: int, rank: int, world_size: int,
                 num_windows: int | None = None, *, prefetch: int = 0,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """This rank's share of ``N`` windows of `dataset` spread evenly over it: LongTensors (rows, seq_len + 1).

    ``N = min(num_windows, len(dataset))`` (all windows when `num_windows` is None); the evaluated windows are
    ``j * len(dataset) // N`` for ``j`` in ``[0, N)``, in that order, so a subset samples the whole split (its
    documents are in corpus order: the first windows alone would be its first source) and does not depend on
    the world size or micro-batch size. Micro-step ``k`` covers ``j`` in ``[k*W*B, (k+1)*W*B)`` and rank ``r``
    its ``r``-th block of ``B`` of them, clipped to ``N``: the last micro-step's batches are shorter, and empty
    (0 rows) on ranks past the end. Every rank yields the same number of batches, so collectives inside the
    forward (ZeRO-3 gathers) stay matched.

    `prefetch` and `pin_memory` as for :class:`ShardedBatches`: the next `prefetch` batches are read by
    background threads while the current one is evaluated; the batches are the same. The threads stop when
    the generator is exhausted or closed (a loop left early), dropping reads not yet started.
    """
    _check_shard(micro_batch_size, rank, world_size)
    _check_prefetch(prefetch)
    if num_windows is not None and (not isinstance(num_windows, int) or num_windows < 1):
        raise ValueError(f"num_windows={num_windows!r} must be a positive int or None")
    n = len(dataset) if num_windows is None else min(num_windows, len(dataset))
    g = micro_batch_size * world_size
    starts = (min(n, k * g + rank * micro_batch_size) for k in range(-(-n // g)))
    blocks = ((start, min(n, start + micro_batch_size)) for start in starts)
    width = dataset[0].shape[-1]

    def read(start: int, stop: int) -> torch.Tensor:
        if stop > start:
            return _batch(dataset, np.arange(start, stop, dtype=np.int64) * len(dataset) // n, pin_memory)
        return torch.empty((0, width), dtype=torch.long)

    if not prefetch:
        for block in blocks:
            yield read(*block)
        return
    pool = _reader_pool(prefetch, pin_memory, "relora_ds-eval-prefetch")
    pending: collections.deque[Future] = collections.deque()
    try:
        for block in blocks:
            pending.append(pool.submit(read, *block))
            if len(pending) > prefetch:  # this batch, and `prefetch` more after it, are being read
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
