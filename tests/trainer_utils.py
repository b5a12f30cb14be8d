"""Shared by the trainer's end-to-end tests (tests/test_trainer*.py): the tiny recipe, runs of
launch/train.py on 2 ranks (as the deepspeed launcher starts them) or 1 (as plain python runs it), and readers of
what a run leaves; and a stand-in data source for the mixture tests."""
import json

import numpy as np
import torch
import yaml

from launch_utils import ROOT, free_port, launch_env, run_deepspeed, run_python, run_ranks

FP32_ZERO2 = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
# warm start 2 steps, resets at steps 6 and 10 (cycle 4), 2-step restart warmups.
RECIPE = dict(model="debug", seq_len=32, mode="relora", rank=4, alpha=8, warm_start_steps=2, cycle_length=4,
              restart_warmup_steps=2, warmup_steps=2, total_steps=12, lr=3e-3, micro_batch_size=4,
              global_batch_size=8, eval_every=6, eval_windows=16, save_every=0, keep_last=5, export=False,
              keep_warm_start=False)  # (its extra checkpoint: tests/test_warm_start_from.py)


def write(tmp_path, data_dir, **overrides):
    recipe = {**RECIPE, "data_dir": str(data_dir), "output_dir": str(tmp_path / "run"), **overrides}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "ds.json").write_text(json.dumps(FP32_ZERO2))
    return tmp_path / "recipe.yaml", tmp_path / "ds.json"


def read_losses(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs


def train2(tmp_path, data_dir, *extra, env=None, check=True, master_port=None, launcher=False, **overrides):
    """Two ranks: started directly as the deepspeed launcher starts them (launch_utils.run_ranks), or with
    launcher=True under the deepspeed launcher itself (the README's command; the conftest reference run)."""
    recipe, ds = write(tmp_path, data_dir, **overrides)
    args = ["--config", recipe, "--deepspeed", ds, *extra]
    if launcher:
        assert env is None and check, "the launcher path runs with the test's environment and must succeed"
        return run_deepspeed(ROOT / "launch/train.py", *args, master_port=master_port)
    return run_ranks(ROOT / "launch/train.py", *args, master_port=master_port, env=env, check=check)


def train1(tmp_path, data_dir, *extra, ds=None, check=True, **overrides):
    """One rank, as plain python runs it (run_python; the trainer reads RANK/WORLD_SIZE)."""
    recipe, ds2 = write(tmp_path, data_dir, **overrides)
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = run_python(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds or ds2, *extra, env=env)
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
    proc = run_python(ROOT / "launch/export.py", run_dir / "checkpoints", "--out", tmp_path / "exported",
                      env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    live = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    assert offline.keys() == live.keys() and all(torch.equal(offline[k], v) for k, v in live.items())


def packed_data_dir(path, train_tokens, val_tokens, *, vocab=512, corpus="corpus-a"):
    """A prepared data dir written by hand (no tokenizer training): `train_tokens` and `val_tokens` token ids
    in uint16, a stand-in tokenizer file with its hash, and a recipe whose corpus fingerprint is `corpus`.
    Writing it again over the same path is preparing the data again."""
    import hashlib

    import numpy as np

    from relora_ds.data.manifest import FORMAT, write_manifest

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(train_tokens)
    rng.integers(0, vocab, train_tokens, dtype=np.uint16).tofile(path / "train.bin")
    rng.integers(0, vocab, val_tokens, dtype=np.uint16).tofile(path / "validation.bin")
    (path / "tokenizer.model").write_bytes(b"stand-in")
    write_manifest(path, {
        "format": FORMAT, "dtype": "uint16", "vocab_size": vocab, "bos_id": 1, "eos_id": 2, "pad_id": None,
        "unk_id": 0, "tokenizer_path": "tokenizer.model", "tokenizer_sha256": hashlib.sha256(b"stand-in").hexdigest(),
        "recipe": {"corpus_fingerprint": corpus, "tokenizer": {"train_bpe": {"vocab_size": vocab}},
                   "val_fraction": 0.01, "max_docs": None},
        "splits": {"train": {"path": "train.bin", "tokens": train_tokens, "documents": 10},
                   "validation": {"path": "validation.bin", "tokens": val_tokens, "documents": 1}}})
    return path


def in_process_trainer(monkeypatch, *, rank=0, world=1):
    """Build Trainers in this process without a process group, an engine or signal handlers: the process group
    is stubbed out and rank 0's start-up work runs in place; DeepSpeed's engine creation fails the test if
    reached. Returns the trainer module. (Close each Trainer built: its output_dir lock.)"""
    import signal

    import deepspeed

    from relora_ds import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(trainer_mod, "single_process_environment", lambda: None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the trainer's SIGTERM/SIGUSR1 handlers: not in pytest
    monkeypatch.setattr(trainer_mod.dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(trainer_mod.dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(trainer_mod, "on_rank_zero", lambda fn: fn() if rank == 0 else None)
    # The ranks are built one after another here, so no rank 0 holds the lock while another checks it
    # (tests/test_trainer.py runs that check on 2 real ranks).
    monkeypatch.setattr(trainer_mod, "check_shared_output_dir", lambda out, rank, world: None)

    def no_engine(**kw):
        raise AssertionError("deepspeed.initialize reached: the check should have come before any engine")
    monkeypatch.setattr(deepspeed, "initialize", no_engine)
    return trainer_mod


class Windows:  # tests/test_data_mixture.py, tests/test_data_resume_fuzz.py
    """A stand-in source: window i of source s is the row [s, i, i, ...] (so a read says where it came from)."""

    def __init__(self, source, size, seq_len=3):
        self.source, self.size, self.seq_len = source, size, seq_len

    def __len__(self):
        return self.size

    def get_batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        out = idx[:, None].repeat(1, self.seq_len + 1)
        out[:, 0] = self.source
        return out
