"""enable_relora under torch's DDP (the Trainer without DeepSpeed on several ranks: accelerate's DDP, gloo here)."""
import torch

from launch_utils import ROOT, run_ranks


def test_under_ddp_every_rank_merges_rank_0s_int8_base(tmp_path):
    """The Trainer without DeepSpeed on 2 ranks (accelerate's DDP, gloo), an int8 base: DDP gives every rank
    rank 0's weights but not the host residuals, and the callback merged through the unwrapped model, so a rank
    whose model was built apart (seeded by rank) merged rank 0's weight_q with its own residual (a review: 14
    weight_q up to 2 steps apart). It merges through the DDP module, which broadcasts them. Oracle: the run whose
    ranks built the same model; both ranks' every tensor bit for bit."""
    for init in ("same", "apart"):
        run_ranks(ROOT / "tests/dist/hf_ddp_worker.py", tmp_path, init, timeout=600)
    want = torch.load(tmp_path / "same_rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"apart_rank{rank}.pt")
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differ, (rank, len(differ), differ[:4])
