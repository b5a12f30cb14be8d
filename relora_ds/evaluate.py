"""Validation loss: the token-weighted mean over windows spread evenly over the validation split, sharded
over ranks, equal to what one process reading every one of them would compute. On a mixture of data dirs
each member's own loss, over windows spread evenly over its own validation split (as for that dir alone),
and the mixture's: the members' losses weighted by the mixture's weights."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .data import MemberSplits, PackedTokens, eval_batches
from .data.mixture import evaluation_windows


_SET_STANCE = hasattr(torch.compiler, "set_stance")  # torch >= 2.6; before it a short batch compiles its own graph


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


def validation_losses(engine, val_data: PackedTokens | MemberSplits, micro_batch_size: int, rank: int, world: int,
                      num_windows: int | None, *, prefetch: int = 0,
                      pin_memory: bool = False) -> tuple[float, int, dict[str, float]]:
    """(mean loss per predicted token, predicted tokens, {member: its loss}) over `num_windows` windows spread
    evenly over `val_data` (None: all; :func:`relora_ds.data.eval_batches`); every rank calls it.
    `prefetch`/`pin_memory`: batches read ahead on background threads, page-locked for asynchronous copies.
    On a mixture (:class:`relora_ds.data.MemberSplits`, from ``open_eval_split``) each member's windows are
    read on their own, every rank the same members in the same order: ``evaluation_windows`` of them (the
    `num_windows` shared out by the weights, at least one per member) spread evenly over the member's split,
    so a member's loss ({label: loss}; {} for one data dir) is what that dir alone gives with as many
    windows; the mixture's loss is the members' weighted by the mixture's weights."""
    if num_windows is not None and (not isinstance(num_windows, int) or num_windows < 1):
        raise ValueError(f"num_windows={num_windows!r} must be a positive int or None")
    engine.eval()
    mixture = isinstance(val_data, MemberSplits)
    if mixture:
        parts = list(zip(val_data.sources, evaluation_windows(val_data.shares, val_data.sizes, num_windows).tolist()))
    else:
        parts = [(val_data, num_windows)]
    total = torch.zeros(2 * len(parts), dtype=torch.float64, device=engine.device)  # per part: (loss sum, tokens)
    with torch.no_grad():
        for i, (part, n) in enumerate(parts):
            _loss_sums(engine, part, micro_batch_size, rank, world, n, prefetch, pin_memory, total[2 * i:2 * i + 2])
    engine.train()
    if world > 1 or dist.is_initialized():  # (launch/evaluate.py: one process, no process group)
        dist.all_reduce(total)
    sums, tokens = total[0::2], total[1::2]
    if not mixture:
        loss = (sums.sum() / tokens.sum()).item() if tokens.sum() > 0 else float("nan")
        return loss, int(tokens.sum().item()), {}
    members = {label: (s / t).item() for label, s, t in zip(val_data.labels, sums, tokens)}
    loss = float(sum(share * value for share, value in zip(val_data.shares.tolist(), members.values())))
    return loss, int(tokens.sum().item()), members
