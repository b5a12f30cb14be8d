"""Validation loss: the token-weighted mean over windows spread evenly over the validation split, sharded
over ranks, equal to what one process reading every one of them would compute."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .data import MixedWindows, PackedTokens, eval_batches


def validation_loss(engine, val_data: PackedTokens | MixedWindows, micro_batch_size: int, rank: int, world: int,
                    num_windows: int | None, *, prefetch: int = 0, pin_memory: bool = False) -> tuple[float, int]:
    """(mean loss per predicted token, predicted tokens) over `num_windows` windows spread evenly over
    `val_data` (None: all; :func:`relora_ds.data.eval_batches`);
    every rank calls it. A rank whose share ran out runs a weightless forward on window 0, so that ZeRO-3's
    parameter gathers stay matched across ranks. `prefetch`/`pin_memory`: batches read ahead on background
    threads, page-locked for asynchronous copies (:func:`relora_ds.data.eval_batches`)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of token losses, tokens)
    with torch.no_grad():
        for batch in eval_batches(val_data, micro_batch_size, rank, world, num_windows=num_windows,
                                  prefetch=prefetch, pin_memory=pin_memory):
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            if tokens == 0:
                batch = val_data[0][None]
            batch = batch.to(engine.device, non_blocking=True)
            total[0] += engine(batch, labels=batch).loss.double() * tokens
            total[1] += tokens
    engine.train()
    dist.all_reduce(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return loss, int(total[1].item())
