"""One optimizer step of the trainer: its micro-batches through the engine, the gradient norm DeepSpeed does
not record without ZeRO, a skipped update (fp16 overflow, a non-finite norm) kept on the schedule, and the one
all-reduce that carries the mean loss and the ranks' stop flag."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

from . import checkpoint


class StepsMixin:
    def _train_step(self) -> float:
        engine, losses = self.engine, []
        self.step_lr = engine.get_lr()[0]  # the lr this step trains with (engine.step() advances the scheduler)
        gas = engine.gradient_accumulation_steps()
        for micro in range(gas):
            batch = next(self.batches).to(engine.device, non_blocking=True)
            loss = engine(batch, labels=batch).loss
            scale = _scale_left_to_us(engine.optimizer)
            engine.backward(loss if scale is None else loss.float() * scale)
            skip = False
            if micro == gas - 1 and self.own_grad_norm:
                self.grad_norm = self._grad_norm_before_step()
                # Without ZeRO, DeepSpeed applies an update whatever the gradients hold (ZeRO and its 16-bit
                # optimizers skip a non-finite norm): skip it as they do, through DeepSpeed's overflow path.
                skip = self.grad_norm is not None and not math.isfinite(self.grad_norm)
            with _update_skipped(engine.optimizer) if skip else contextlib.nullcontext():
                engine.step()
            if scale is not None and micro == gas - 1 and isinstance(engine.optimizer, FP16_UnfusedOptimizer):
                # It records the norm of the scaled gradients (ZeRO and FP16_Optimizer: the unscaled one).
                norm = engine.get_global_grad_norm()
                self.grad_norm = None if norm is None else norm / scale
            losses.append(loss.detach().float())
        if not engine.was_step_applied():
            # An fp16 overflow (or a non-finite gradient norm under ZeRO/bf16): DeepSpeed skips the update and
            # does not advance the scheduler, but the step counts (resets come from self.step): keep the
            # schedule on the step (a reset's lr stays the schedule's: 0 with a restart warmup).
            engine.lr_scheduler.step()
            reason = "fp16 overflow: loss scale lowered" if self.fp16 else "non-finite gradient norm"
            lowered = getattr(engine.optimizer, "loss_scale", None)  # (ZeRO's and the FP16 optimizers': not cur_scale)
            self._event({"event": "step_skipped", "step": self.step + 1, "reason": reason,
                         "loss_scale": float(lowered) if lowered is not None else None})
        # One all-reduce carries the loss and whether any rank was asked to stop.
        stop = torch.tensor(float(self._stop_signal > 0), device=losses[0].device)
        flags = torch.stack([torch.stack(losses).mean(), stop])
        dist.all_reduce(flags)
        total, stop = flags.tolist()  # one device-to-host copy per step
        mean = total / self.world
        self._stop_agreed = stop > 0
        if not math.isfinite(mean):
            last = checkpoint.latest_tag(self.ckpt_dir)
            raise FloatingPointError(
                f"non-finite loss ({mean}) at step {self.step + 1}; stopping. Last good checkpoint: "
                f"{self.ckpt_dir / last if last else 'none'} (kept; resume with --resume, e.g. with a lower lr)")
        return mean

    def _grad_norm_before_step(self) -> float | None:
        """Without ZeRO (stage 0, fp32) DeepSpeed clips with torch but records no norm: compute it from the
        reduced gradients (whole on every rank there). ZeRO and DeepSpeed's FP16/BF16 optimizers record the
        (unscaled) norm themselves (get_global_grad_norm)."""
        norms = [p.grad.float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else None


def _scale_left_to_us(optimizer) -> float | None:
    """The fp16 loss scale that ``engine.backward`` does not apply, None where it applies its own or none:
    DeepSpeed 0.19.8 scales the loss for its ZeRO optimizers only (deepspeedai/DeepSpeed PR #8393, open), while at
    ZeRO stage 0 its FP16 optimizers divide the gradients by the scale in ``step()``: updates 2^16 times too small
    (Adam's eps then dominates them), the clip compared with the norm over the scale (never reached), small fp16
    gradients flushed to zero. The trainer scales the loss as their own ``backward`` does."""
    if isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)) and not isinstance(optimizer, ZeROOptimizer) \
            and optimizer.loss_scale_config.use_grad_scaling:  # (fp16, not bf16)
        return float(optimizer.loss_scale)
    return None


@contextlib.contextmanager
def _update_skipped(optimizer):
    """Inside, ``engine.step()`` at ZeRO stage 0 skips the update as for an fp16 overflow: the optimizer's
    step does nothing and its ``overflow`` flag tells the engine (skipped_steps + 1, scheduler held,
    was_step_applied() False); the gradients are cleared as after any step."""
    saved = {k: optimizer.__dict__[k] for k in ("step", "overflow") if k in optimizer.__dict__}
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        for k in ("step", "overflow"):
            optimizer.__dict__.pop(k, None)
        optimizer.__dict__.update(saved)
