"""One process: a debug-preset run through the warm-start switch, checking that the full-rank engine (and its
optimizer) is gone when DeepSpeed builds the ReLoRA engine, so the two never hold device memory together, and
that the parameters trained full-rank on both sides keep their fp32 masters across it (not the bf16 copies'
rounding). The run starts from an fp32 Hugging Face directory (hf_model), whose values its masters must start
from. argv: output_dir, data_dir, DeepSpeed JSON."""
import gc
import sys
import weakref

import deepspeed

import torch

from relora_ds import engines
from relora_ds.distributed import exit_process
from relora_ds.engine_state import full_fp32_state_dict
from relora_ds.hf import export_hf, hf_tensors
from relora_ds.model import LlamaForCausalLM
from relora_ds.model_config import LlamaConfig
from relora_ds.relora import lora_parameters
from relora_ds.train_config import TrainConfig
from relora_ds.trainer import Trainer

out, data_dir, ds_json = sys.argv[1:4]
built, alive_at_build = [], []
real_initialize = deepspeed.initialize


def initialize(**kw):
    gc.collect()  # only what is still referenced survives this
    alive_at_build.append([ref() is not None for ref in built])
    engine, *rest = real_initialize(**kw)
    built.extend([weakref.ref(engine), weakref.ref(engine.optimizer)])
    return (engine, *rest)


deepspeed.initialize = initialize
masters = {}
real_switch = engines.EnginesMixin._switch_to_lowrank


def switch(self):
    masters["before"] = full_fp32_state_dict(self.engine)
    real_switch(self)
    lora = {id(p) for p in lora_parameters(self.engine.module)}
    full_rank = {n for n, p in self.engine.module.named_parameters() if p.requires_grad and id(p) not in lora}
    masters["after"] = {n: t for n, t in full_fp32_state_dict(self.engine).items() if n in full_rank}


engines.EnginesMixin._switch_to_lowrank = switch
real_source_masters = engines.EnginesMixin._source_masters


def source_masters(self):
    real_source_masters(self)
    masters["start"] = full_fp32_state_dict(self.engine)


engines.EnginesMixin._source_masters = source_masters
source = f"{out}-source"
torch.manual_seed(1)
export_hf(LlamaForCausalLM(LlamaConfig.preset("debug")), source, dtype=torch.float32, token_ids={"bos_token_id": 1, "eos_token_id": 2})
cfg = TrainConfig(hf_model=source, rank=8, total_steps=4, warm_start_steps=2, cycle_length=2, restart_warmup_steps=1,
                  warmup_steps=1, micro_batch_size=2, global_batch_size=2, seq_len=32, eval_every=0, save_every=0,
                  export=False, output_dir=out, data_dir=data_dir)
trainer = Trainer(cfg, ds_json)
trainer.train()
trainer.close()
print("ALIVE_AT_BUILD", alive_at_build)
before, after = masters["before"], masters["after"]
stored = dict(hf_tensors(source))
print("SOURCE_MASTERS", sorted(masters["start"]) == sorted(stored) and all(
    torch.equal(stored[n], t) for n, t in masters["start"].items()),
    "SOURCE_ROUNDED_DIFFERS", any(not torch.equal(t, t.bfloat16().float()) for t in stored.values()))
print("MASTERS_KEPT", sorted(after) != [] and all(torch.equal(before[n], t) for n, t in after.items()),
      "ROUNDED_DIFFERS", any(not torch.equal(before[n], before[n].bfloat16().float()) for n in after))
sys.stdout.flush()
exit_process(0)  # no interpreter teardown, where gloo's threads can abort a finished process (exit -6)
