"""2-rank worker for tests/test_trainer_steps.py: the LoRA dropout masks each rank draws. A run straight into
the ReLoRA phase (no warm start) with dropout 0.1; the first keep-mask each rank draws is compared with the
mask drawn from a generator seeded as the README documents for a start at step 0 (sha256 of
"seed/dropout/step/rank", its first 8 bytes little-endian, 63 bits), and its hash is printed, so the test can
see that the ranks' masks differ. argv: output_dir, data_dir."""
import hashlib
import sys

import numpy as np
import torch
import torch.distributed as dist

import relora_kernels.torch_linear as torch_linear
from relora_ds.distributed import exit_process
from relora_ds.train_config import TrainConfig
from relora_ds.trainer import Trainer

out, data_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
SEED = 7
first = []
real = torch_linear.dropout_keep_mask


def recording(x, p, generator=None):
    if not first:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            digest = hashlib.sha256(f"{SEED}/dropout/0/{dist.get_rank()}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            want = real(x, p, generator)
        keep = real(x, p, generator)
        first.append((keep, torch.equal(keep, want)))
        return keep
    return real(x, p, generator)


torch_linear.dropout_keep_mask = recording
cfg = TrainConfig(rank=8, dropout=0.1, seed=SEED, total_steps=1, warm_start_steps=0, warmup_steps=0, cycle_length=4,
                  restart_warmup_steps=1, micro_batch_size=2, global_batch_size=4, seq_len=32, eval_every=0,
                  save_every=0, export=False, output_dir=out, data_dir=data_dir)
trainer = Trainer(cfg, "ds_configs/zero2_fp32.json")
trainer.train()
keep, as_seeded = first[0]
digest = hashlib.sha256(np.ascontiguousarray(keep.cpu().numpy()).tobytes()).hexdigest()[:16]
# One write: print's separate newline let the two ranks' lines (on one shared stdout) join into one.
sys.stdout.write(f"RANK {dist.get_rank()} AS_SEEDED {as_seeded} MASK {digest} {tuple(keep.shape)}\n")
sys.stdout.flush()
trainer.close()
exit_process(0)
