"""Validation loss: the token-weighted mean over windows spread evenly over the validation split, sharded
over ranks, equal to what one process reading every one of them would compute. On a mixture of data dirs
also each member's own loss over its windows among them, from the same forward passes."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from .data import MixedWindows, PackedTokens, eval_batches


_SET_STANCE = hasattr(torch.compiler, "set_stance")  # torch >= 2.6; before it a short batch compiles its own graph


class _Selected:
    """Windows ``indices`` of ``dataset``, in that order, as a dataset of their own."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, idx) -> torch.Tensor:
        return self.dataset.get_batch(self.indices[np.asarray(idx, dtype=np.int64)])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.get_batch([int(i)])[0]


def _loss_sums(engine, dataset, micro_batch_size: int, rank: int, world: int, num_windows: int | None,
               prefetch: int, pin_memory: bool, total: torch.Tensor) -> None:
    """Adds this rank's (sum of token losses, tokens) over its share of ``dataset`` into ``total``. A rank
    whose share ran out runs a weightless forward on window 0, so that ZeRO-3's gathers stay matched."""
    for batch in eval_batches(dataset, micro_batch_size, rank, world, num_windows=num_windows,
                              prefetch=prefetch, pin_memory=pin_memory):
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        if tokens == 0:
            batch = dataset[0][None]
        batch = batch.to(engine.device, non_blocking=True)
        # A short batch (a rank's last, or the weightless one) runs compiled layers (--compile) eagerly: each
        # batch size would be one more compile and cache entry for at most one batch per evaluation.
        with contextlib.nullcontext() if batch.shape[0] == micro_batch_size or not _SET_STANCE else \
                torch.compiler.set_stance("force_eager"):
            total[0] += engine(batch, labels=batch).loss.double() * tokens
        total[1] += tokens


def validation_losses(engine, val_data: PackedTokens | MixedWindows, micro_batch_size: int, rank: int, world: int,
                      num_windows: int | None, *, prefetch: int = 0,
                      pin_memory: bool = False) -> tuple[float, int, dict[str, float]]:
    """(mean loss per predicted token, predicted tokens, {member: its loss}) over `num_windows` windows spread
    evenly over `val_data` (None: all; :func:`relora_ds.data.eval_batches`); every rank calls it.
    `prefetch`/`pin_memory`: batches read ahead on background threads, page-locked for asynchronous copies.
    On a mixture (:class:`relora_ds.data.MixedWindows`) also each member's loss over its windows among the
    evaluated ones ({label: loss}; {} for one data dir): the mixture's windows are evaluated member by member
    (every rank the same members, in the same order), so the mixed loss is the token-weighted mean of the
    members' over the same windows."""
    if num_windows is not None and (not isinstance(num_windows, int) or num_windows < 1):
        raise ValueError(f"num_windows={num_windows!r} must be a positive int or None")
    engine.eval()
    mixture = isinstance(val_data, MixedWindows)
    parts = [val_data] if not mixture else []
    if mixture:
        n = len(val_data) if num_windows is None else min(num_windows, len(val_data))
        member, window = val_data.locate(np.arange(n, dtype=np.int64) * len(val_data) // n)
        parts = [_Selected(val_data.sources[m], window[member == m]) for m in range(len(val_data.sources))]
    total = torch.zeros(2 * len(parts), dtype=torch.float64, device=engine.device)  # per part: (loss sum, tokens)
    with torch.no_grad():
        for i, part in enumerate(parts):
            if len(part):  # the same on every rank: the selection does not depend on the rank
                _loss_sums(engine, part, micro_batch_size, rank, world, None if mixture else num_windows,
                           prefetch, pin_memory, total[2 * i:2 * i + 2])
    engine.train()
    if world > 1 or dist.is_initialized():  # (launch/evaluate.py: one process, no process group)
        dist.all_reduce(total)
    sums, tokens = total[0::2], total[1::2]
    loss = (sums.sum() / tokens.sum()).item() if tokens.sum() > 0 else float("nan")
    members = {label: (s / t).item() for label, s, t in zip(val_data.labels, sums, tokens) if t > 0} if mixture else {}
    return loss, int(tokens.sum().item()), members
