"""2-rank worker for tests/test_stage0_review.py: fp16 steps through the trainer's step (relora_ds/steps.py) on a
real DeepSpeed engine, while DeepSpeed's dynamic loss scale rises (``loss_scale_window`` 1: after each stable step),
against one process seeing both ranks' data in float64.

Per case (ZeRO stage 0 fp16, as ``mode: full`` runs it, and ZeRO-1/2/3 fp16 for comparison) three optimizer steps of
2 ranks x 2 micro-batches on a full-rank debug model, with a gradient clip every step exceeds (``clip``) or none
(``noclip``). The oracle: torch.optim.AdamW in float64 on the clipped global gradient (as tests/dist/
loss_review_worker.py; Adam's eps is large next to the gradients, so the update is nearly linear in them). Prints
``<case> step <k>: scale <before> -> <after> update <rel err> grad_norm <rel err>`` on rank 0. Last, the weights
``relora_ds.engine_state.full_fp32_state_dict`` reads after a stage-0 fp16 run against that optimizer's fp32
masters: ``masters <case>: <max abs difference> of <max abs update>``.
"""
import copy
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.engine_state import full_fp32_state_dict
from relora_ds.steps import StepsMixin

from loss_review_worker import oracle  # tests/dist, this script's folder

VOCAB, SEQ, MICRO, ACCUM, STEPS = 61, 9, 2, 2, 3
LR, BETAS, EPS, CLIP = 1e-2, (0.9, 0.95), 1e-3, 0.05
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
# (name, zero_optimization, gradient_clipping, torch_adam). torch AdamW at stage 0 runs under DeepSpeed's
# FP16_UnfusedOptimizer, its FusedAdam (torch_adam false) under FP16_Optimizer.
CASES = (("stage0_unfused_clip", {"stage": 0}, CLIP, True), ("stage0_unfused_noclip", {"stage": 0}, 0.0, True),
         ("stage0_fused_clip", {"stage": 0}, CLIP, False), ("zero1_clip", {"stage": 1}, CLIP, True),
         ("zero2_noclip", {"stage": 2}, 0.0, True), ("zero3_clip", ZERO3, CLIP, True))


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=VOCAB))


def batches(world: int) -> torch.Tensor:
    """(STEPS, world, ACCUM, MICRO, SEQ + 1): step s's micro-batch k on rank r at [s, r, k]."""
    return torch.randint(0, VOCAB, (STEPS, world, ACCUM, MICRO, SEQ + 1), generator=torch.Generator().manual_seed(1))


class _Step(StepsMixin):
    """The trainer's step (relora_ds/steps.py) with only what it reads."""

    def __init__(self, engine, micro_batches):
        self.engine, self.batches, self.own_grad_norm = engine, iter(micro_batches), False
        self.grad_norm, self._stop_signal, self.step, self.fp16 = None, 0, 0, True
        self.world, self.ckpt_dir, self._event = dist.get_world_size(), Path("."), print


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def engine_for(m, zero: dict, clip: float, torch_adam: bool):
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": clip,
          "zero_optimization": zero, "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                                                    "torch_adam": torch_adam}}}
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=ds, lr_scheduler=constant_lr)
    return engine


def case(name, zero, clip, torch_adam, rank, world) -> None:
    m = model()
    reference = copy.deepcopy(m)
    data = batches(world)
    engine = engine_for(m, zero, clip, torch_adam)
    want = oracle(reference, data, zero_step=zero["stage"] == 0, clip=clip)
    names = [n for n, _ in engine.module.named_parameters()]
    before = full_fp32_state_dict(engine)
    for s in range(STEPS):
        scale = float(engine.optimizer.loss_scale)
        t = _Step(engine, list(data[s, rank]))
        t._train_step()
        norm = t.grad_norm if t.grad_norm is not None else engine.get_global_grad_norm()  # as the trainer logs
        after = full_fp32_state_dict(engine)
        start = before if s == 0 else want[s - 1]["params"]
        num = sum(((after[n].double() - before[n].double()) - (want[s]["params"][n] - start[n].double())).pow(2).sum()
                  for n in names)
        den = sum((want[s]["params"][n] - start[n].double()).pow(2).sum() for n in names)
        if rank == 0:
            print(f"{name} step {s + 1}: scale {scale:g} -> {float(engine.optimizer.loss_scale):g} "
                  f"update {(num / den).sqrt().item():.3g} "
                  f"grad_norm {abs(float(norm) - want[s]['grad_norm']) / want[s]['grad_norm']:.3g} "
                  f"({type(engine.optimizer).__name__})", flush=True)
        before = after
    engine.destroy()


def masters(name: str, torch_adam: bool, rank: int, world: int) -> None:
    """After STEPS stage-0 fp16 steps: how far what full_fp32_state_dict returns is from the optimizer's fp32
    masters (FP16_Optimizer: fp32_groups_flat; FP16_UnfusedOptimizer: fp32_groups), next to the largest update."""
    m = model()
    first = {n: p.detach().clone() for n, p in m.named_parameters()}
    engine = engine_for(m, {"stage": 0}, CLIP, torch_adam)
    data = batches(world)
    for s in range(STEPS):
        _Step(engine, list(data[s, rank]))._train_step()
    opt = engine.optimizer
    flats = opt.fp32_groups_flat if hasattr(opt, "fp32_groups_flat") else None
    want = {}
    for i, group in enumerate(opt.fp16_groups):
        fp32 = opt.fp32_groups[i] if flats is None else \
            torch._utils._unflatten_dense_tensors(flats[i], group)
        want.update({id(p): q.detach() for p, q in zip(group, fp32)})
    got = full_fp32_state_dict(engine)
    named = dict(engine.module.named_parameters())
    diff = max((got[n] - want[id(p)]).abs().max().item() for n, p in named.items())
    moved = max((want[id(p)] - first[n]).abs().max().item() for n, p in named.items())
    if rank == 0:
        print(f"masters {name}: {diff:.3g} of {moved:.3g} ({type(opt).__name__})", flush=True)
    engine.destroy()


def main():
    init_distributed()
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True  # (the CPU accelerator refuses fp16; it runs)
    rank, world = dist.get_rank(), dist.get_world_size()
    only = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for name, *settings in CASES:
        if not only or name in only:
            case(name, *settings, rank, world)
    for name, torch_adam in (("unfused", True), ("fused", False)):
        if not only or f"masters_{name}" in only:
            masters(name, torch_adam, rank, world)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)
