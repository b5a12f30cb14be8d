"""Shared by the trainer's end-to-end tests (tests/test_trainer*.py): the tiny recipe, runs of
launch/train.py on 2 ranks (deepspeed launcher) or 1 (plain python), and readers of what a run leaves."""
import json
import os
import subprocess
import sys

import yaml

from launch_utils import ROOT, free_port, launch_env, run_deepspeed

FP32_ZERO2 = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
# warm start 2 steps, resets at steps 6 and 10 (cycle 4), 2-step restart warmups.
RECIPE = dict(model="debug", seq_len=32, mode="relora", rank=4, alpha=8, warm_start_steps=2, cycle_length=4,
              restart_warmup_steps=2, warmup_steps=2, total_steps=12, lr=3e-3, micro_batch_size=4,
              global_batch_size=8, eval_every=6, eval_windows=16, save_every=0, keep_last=5, export=False)


def write(tmp_path, data_dir, **overrides):
    recipe = {**RECIPE, "data_dir": str(data_dir), "output_dir": str(tmp_path / "run"), **overrides}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "ds.json").write_text(json.dumps(FP32_ZERO2))
    return tmp_path / "recipe.yaml", tmp_path / "ds.json"


def read_losses(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs


def train2(tmp_path, data_dir, *extra, env=None, check=True, master_port=None, **overrides):
    recipe, ds = write(tmp_path, data_dir, **overrides)
    args = ["--config", recipe, "--deepspeed", ds, *extra]
    if env is None:
        return run_deepspeed(ROOT / "launch/train.py", *args, master_port=master_port)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / "launch/train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env={**launch_env(), **env}, capture_output=True, text=True, timeout=600)


def train1(tmp_path, data_dir, *extra, ds=None, check=True, **overrides):
    """One rank, plain python (the trainer reads RANK/WORLD_SIZE)."""
    recipe, ds2 = write(tmp_path, data_dir, **overrides)
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(recipe), "--deepspeed",
                           str(ds or ds2), *map(str, extra)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rewind_to(run_dir, tag):
    """As if the job had died right after saving ``tag``: ``latest`` names it, later metrics are gone."""
    (run_dir / "checkpoints" / "latest").write_text(tag)
    (run_dir / "metrics.jsonl").unlink()


def export_equals_the_trainers(run_dir, tmp_path):
    """launch/export.py on the checkpoints alone gives the weights the trainer exported from its live model."""
    import torch
    import transformers
    proc = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), str(run_dir / "checkpoints"), "--out",
                           str(tmp_path / "exported")], capture_output=True, text=True, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    live = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    assert offline.keys() == live.keys() and all(torch.equal(offline[k], v) for k, v in live.items())
