"""2-rank worker for tests/test_weight_decay.py: each DeepSpeed optimizer the trainer can build keeps the weight
decay of each param group the trainer passes (relora_ds.engines.optimizer_groups): none on the norms.

One optimizer step with every gradient zero: Adam's moments stay zero, its update 0 / (0 + eps) is zero, and
AdamW's decoupled decay alone moves each parameter, p -> p * (1 - lr * weight_decay). So a parameter with
decay ends at p * (1 - lr * wd), one without ends where it started (the oracle: this formula on the
parameters gathered before the step). Prints one line per case and parameter kind for pytest to read.
"""
import deepspeed
import torch
import torch.distributed as dist

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.engine_state import full_fp32_state_dict
from relora_ds.engines import optimizer_groups
from relora_ds.train_config import TrainConfig

LR, WD = 0.1, 0.5
# (name, zero_optimization, bf16, decay_norms_and_biases): stage 0 (the torch optimizer itself), ZeRO-1 in bf16
# (fp32 masters), ZeRO-2, ZeRO-3 with every parameter split, and ZeRO-2 offloaded (DeepSpeedCPUAdam); the
# norms decayed too (the option) at ZeRO-3.
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
CASES = (("stage0", {"stage": 0}, False, False), ("zero1_bf16", {"stage": 1}, True, False),
         ("zero2", {"stage": 2}, False, False), ("zero3", ZERO3, False, False),
         ("zero2_offload", {"stage": 2, "offload_optimizer": {"device": "cpu"}}, False, False),
         ("zero3", ZERO3, False, True))


def main():
    init_distributed()
    for name, zero, bf16, decay_vectors in CASES:
        cfg = TrainConfig(cycle_length=4, total_steps=8, weight_decay=WD, decay_norms_and_biases=decay_vectors)
        torch.manual_seed(0)
        model = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=64)), rank=4)
        offload = "offload_optimizer" in zero
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": bf16},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD,
                                                        **({} if offload else {"torch_adam": True})}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, cfg), config=ds)
        before = full_fp32_state_dict(engine)
        x = torch.randint(0, 64, (1, 9))
        engine.backward(engine(x, labels=x).loss * 0.0)
        engine.step()
        after = full_fp32_state_dict(engine)
        trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        seen = {}
        for n in sorted(trained):
            kind = "norm" if n.endswith("norm.weight") else "lora" if "lora_" in n else "matrix"
            if kind == "lora" and not before[n].any():  # lora_B starts at zero: no decay to see
                continue
            want = before[n] * (1 - LR * (WD if kind != "norm" or decay_vectors else 0.0))
            ok = torch.allclose(after[n], want, rtol=1e-6, atol=0) and not torch.equal(after[n], before[n]) \
                if kind != "norm" or decay_vectors else torch.equal(after[n], before[n])
            seen.setdefault(kind, []).append(ok or n)
        if dist.get_rank() == 0:
            for kind, results in sorted(seen.items()):
                bad = [r for r in results if r is not True]
                print(f"{name} decay_vectors={decay_vectors} {kind}: "
                      f"{'ok' if not bad else 'WRONG ' + ', '.join(bad)} ({len(results)})", flush=True)
        engine.destroy()


if __name__ == "__main__":
    run_and_exit(main)
