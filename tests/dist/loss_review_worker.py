"""2-rank worker for tests/test_loss_review.py: what the trainer optimizes and logs (its step, relora_ds/steps.py,
on a real DeepSpeed engine) against one process seeing both ranks' data in float64.

Per case (a ZeRO stage, fp32, bf16 or fp16, offload, tied embeddings, the plain or the chunked loss) two optimizer
steps of 2 ranks x 2 micro-batches on a LoRA-wrapped model whose embedding, head and norms train full-rank (fp16 at
stage 0: the whole model, as mode full), under a gradient clip that every step exceeds. The oracle, on a float64
copy of the same initial weights: the token-weighted mean loss over the step's 4 micro-batches, its gradient's norm
over every trainable parameter, that gradient clipped as torch's clip_grad_norm_ (and DeepSpeed) clip, and
torch.optim.AdamW's step on it. Adam's eps is large next to the gradients, so the update is nearly linear in the
clipped gradient (without that Adam's first step is sign-like and hides its scale). Prints one line per case and
step for pytest to read: ``<case> step <k>: loss <rel err> grad_norm <rel err> update <rel err>``. Before training,
each case's validation loss (relora_ds/evaluate.py) over windows spread over a split, with a short and an empty last
micro-batch on a rank, against the same loss summed window by window: ``<case> eval <N>: <rel err> tokens <n>``. The
cases with the chunked loss also mask documents (their EOS in every window, documents crossing windows). Last, an
fp16 step at stage 0 that overflows: ``overflow: <the trainer's events>``.
"""
import copy
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.engine_state import full_fp32_state_dict
from relora_ds.evaluate import validation_losses
from relora_ds.steps import StepsMixin

VOCAB, SEQ, MICRO, ACCUM, STEPS = 61, 9, 2, 2, 2  # a vocab no chunk divides; seq_len 9: windows of 10 tokens
EOS, VAL_WINDOWS = 3, 11
LR, BETAS, EPS, CLIP = 1e-2, (0.9, 0.95), 1e-3, 0.05
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
# (name, zero_optimization, 16-bit type or None, loss_chunk_size, model options). fp16 at stage 0 trains full-rank
# (the trainer's mode full: relora and lora refuse 16-bit weights at stage 0).
TIED, FULL = {"tied": True}, {"lora": False}
CASES = (("stage0", {"stage": 0}, None, 0, {}), ("zero1", {"stage": 1}, None, 7, {}),
         ("zero2", {"stage": 2}, None, 0, {}), ("zero3", ZERO3, None, 7, {}), ("zero3_plain", ZERO3, None, 0, {}),
         ("zero2_offload", {"stage": 2, "offload_optimizer": {"device": "cpu"}}, None, 5, {}),
         ("zero2_tied", {"stage": 2}, None, 7, TIED), ("zero3_tied", ZERO3, None, 7, TIED),
         ("zero1_bf16", {"stage": 1}, "bf16", 0, {}), ("zero3_bf16", ZERO3, "bf16", 7, {}),
         ("stage0_fp16", {"stage": 0}, "fp16", 0, FULL), ("stage0_fp16_chunked", {"stage": 0}, "fp16", 7, FULL),
         ("zero2_fp16", {"stage": 2}, "fp16", 7, {}), ("zero3_fp16", ZERO3, "fp16", 0, {}))


def model(tied: bool = False, lora: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=VOCAB, tie_word_embeddings=tied))
    m = relora_ds.wrap(m, rank=4) if lora else m
    with torch.no_grad():  # lora_B starts at 0, which leaves lora_A no gradient at the first step
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return m


def batches(world: int) -> torch.Tensor:
    """(STEPS, world, ACCUM, MICRO, SEQ + 1): step s's micro-batch k on rank r at [s, r, k]."""
    g = torch.Generator().manual_seed(1)
    return with_eos(torch.randint(0, VOCAB, (STEPS, world, ACCUM, MICRO, SEQ + 1), generator=g))


def with_eos(windows: torch.Tensor) -> torch.Tensor:
    """Documents of 1 to 6 tokens, each ending at EOS, packed across windows (as prepare_data packs them)."""
    flat = windows.flatten().clone()
    g = torch.Generator().manual_seed(2)
    ends = torch.randint(1, 7, (flat.numel(),), generator=g).cumsum(0)
    flat[ends[ends < flat.numel()]] = EOS
    return flat.view_as(windows)


def eval_oracle(reference: LlamaForCausalLM, windows: torch.Tensor, n: int | None) -> float:
    """The mean loss per predicted token over windows j * L // n (j < n) of L, one window at a time, float64."""
    ref, total = copy.deepcopy(reference).double(), len(windows)
    n = total if n is None else n
    with torch.no_grad():
        sums = [F.cross_entropy(ref(w[None]).logits[0, :-1], w[1:], reduction="sum")
                for w in windows[[j * total // n for j in range(n)]]]
    return (sum(sums) / (n * SEQ)).item()


def oracle(reference: LlamaForCausalLM, data: torch.Tensor, zero_step: bool, clip: float = CLIP) -> list[dict]:
    """Per step: the global batch's mean loss per predicted token, its gradient norm, and the parameters after
    AdamW's step on the gradient clipped to `clip` (0: not clipped), all in float64 in one process (also
    tests/dist/stage0_review_worker.py's oracle). `zero_step`: one AdamW step on zero
    gradients first, as DeepSpeed's FP16_UnfusedOptimizer takes at its start (its initialize_optimizer_states:
    Adam's step count, and so its bias correction, is one ahead)."""
    ref = reference.double()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    if zero_step:
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    out = []
    for step in data:
        windows = step.reshape(-1, SEQ + 1)  # every rank's every micro-batch
        logits = ref(windows).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1), reduction="sum") \
            / windows[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        coef = min(1.0, clip / (norm.item() + 1e-6)) if clip else 1.0
        for p in params:
            p.grad.mul_(coef)
        opt.step()
        out.append({"loss": loss.item(), "grad_norm": norm.item(),
                    "params": {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}})
    return out


class _Step(StepsMixin):
    """The trainer's step (relora_ds/steps.py) with only what it reads."""

    def __init__(self, engine, micro_batches, own_grad_norm: bool, fp16: bool):
        self.engine, self.batches, self.own_grad_norm = engine, iter(micro_batches), own_grad_norm
        self.grad_norm, self._stop_signal, self.step, self.fp16 = None, 0, 0, fp16
        self.world, self.ckpt_dir, self._event = dist.get_world_size(), Path("."), print


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def overflow(rank: int) -> None:
    """fp16 at stage 0 under a loss scale of 2^30, which the first step's gradients overflow: the trainer skips
    it and its step_skipped event names the lowered scale. Prints ``overflow: <events>``."""
    m = model(lora=False)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
          "zero_optimization": {"stage": 0}, "fp16": {"enabled": True, "initial_scale_power": 30},
          "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=ds, lr_scheduler=constant_lr)
    events = []
    t = _Step(engine, list(batches(dist.get_world_size())[0, rank]), own_grad_norm=False, fp16=True)
    t._event = events.append
    t._train_step()
    if rank == 0:
        print(f"overflow: {events}", flush=True)
    engine.destroy()


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


def case(name, zero, half, chunk, model_kw, rank, world) -> None:
    m = model(**model_kw)
    if chunk:
        m.document_masking_enable(EOS)
    reference = copy.deepcopy(m)
    if chunk:
        m.chunked_loss_enable(chunk)
    data = batches(world)
    val = with_eos(torch.randint(0, VOCAB, (VAL_WINDOWS, SEQ + 1), generator=torch.Generator().manual_seed(3)))
    want_eval = {n: eval_oracle(reference, val, n) for n in (5, None)}
    want = oracle(reference, data, zero_step=half == "fp16" and zero["stage"] == 0)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
          "gradient_clipping": CLIP, "zero_optimization": zero, "bf16": {"enabled": half == "bf16"},
          "fp16": {"enabled": half == "fp16", "initial_scale_power": 8},
          "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                                                    **({} if "offload_optimizer" in zero else {"torch_adam": True})}}}
    engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad],
                                      config=ds, lr_scheduler=constant_lr)
    for n, want_loss in want_eval.items():  # 5 windows: a short and an empty last micro-batch; all 11: a short one
        got, tokens, _ = validation_losses(engine, val, MICRO, rank, world, n)
        if rank == 0:
            print(f"{name} eval {n}: {rel(got, want_loss):.3g} tokens {tokens}", flush=True)
    trained = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    before = full_fp32_state_dict(engine)
    own = zero["stage"] == 0 and half is None  # as the trainer decides (relora_ds/trainer.py)
    for s in range(STEPS):
        t = _Step(engine, list(data[s, rank]), own, fp16=half == "fp16")
        loss = t._train_step()
        norm = t.grad_norm if t.grad_norm is not None else engine.get_global_grad_norm()  # as the trainer logs
        after = full_fp32_state_dict(engine)
        start = before if s == 0 else {n: want[s - 1]["params"][n] for n in trained}
        num = sum(((after[n].double() - before[n].double()) - (want[s]["params"][n] - start[n].double())).pow(2).sum()
                  for n in trained)
        den = sum((want[s]["params"][n] - start[n].double()).pow(2).sum() for n in trained)
        if rank == 0:
            print(f"{name} step {s + 1}: loss {rel(loss, want[s]['loss']):.3g} "
                  f"grad_norm {rel(float(norm), want[s]['grad_norm']):.3g} update {(num / den).sqrt().item():.3g} "
                  f"(norm {float(norm):.5g} want {want[s]['grad_norm']:.5g})", flush=True)
        before = after
    engine.destroy()


def main():
    init_distributed()
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True  # (the CPU accelerator refuses fp16; it runs)
    rank, world = dist.get_rank(), dist.get_world_size()
    only = sys.argv[1:] and [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    for name, *settings in CASES:
        if not only or name in only:
            case(name, *settings, rank, world)
    if not only or "overflow" in only:
        overflow(rank)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)
