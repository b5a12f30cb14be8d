"""One process: a debug-preset run through the warm-start switch, checking that the full-rank engine (and its
optimizer) is gone when DeepSpeed builds the ReLoRA engine, so the two never hold device memory together.
argv: output_dir, data_dir, DeepSpeed JSON."""
import gc
import sys
import weakref

import deepspeed

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
cfg = TrainConfig(model="debug", rank=8, total_steps=4, warm_start_steps=2, cycle_length=2, restart_warmup_steps=1,
                  warmup_steps=1, micro_batch_size=2, global_batch_size=2, seq_len=32, eval_every=0, save_every=0,
                  export=False, output_dir=out, data_dir=data_dir)
trainer = Trainer(cfg, ds_json)
trainer.train()
trainer.close()
print("ALIVE_AT_BUILD", alive_at_build)
