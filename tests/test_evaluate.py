"""The validation loss across ranks and ragged batches (relora_ds/evaluate.py through the trainer), on a stub
engine."""
import pytest


@pytest.mark.parametrize("prefetch", [0, 3])
def test_evaluation_weights_each_window_once_across_ragged_batches_and_ranks(monkeypatch, prefetch):
    """Trainer.evaluate (relora_ds/evaluate.py) on a stub engine whose loss is a batch's mean of known
    per-window values: 10 windows in micro-batches of 4 on 2 ranks (rank 0: windows 0-3 and 8-9, rank 1: 4-7
    and an empty batch, which still runs a weightless forward). The validation loss must be the plain mean of the 10 values, as one
    process over all windows would give; a mean of batch means (or a full weight for the short batch, or
    any weight for the empty one) gives another number."""
    import threading
    from types import SimpleNamespace

    import torch

    from relora_ds import evaluate
    from relora_ds import trainer as trainer_mod

    value = torch.tensor([float(i * i + 1) for i in range(10)])  # window i's "loss"
    windows = torch.zeros(10, 9, dtype=torch.long)
    windows[:, 0] = torch.arange(10)
    read_by = set()  # the threads that read windows: the trainer's data_prefetch reaches the evaluation

    class Windows:
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            read_by.add(threading.current_thread().name.startswith("relora_ds-eval-prefetch"))
            return windows[i]

    val_data = Windows()
    seen = []

    class Engine:  # in training mode between evaluations, as the trainer keeps it; no dropout in eval
        device = "cpu"
        training = True

        def eval(self):
            self.training = False

        def train(self):
            self.training = True

        def __call__(self, batch, labels):
            assert not self.training and not torch.is_grad_enabled(), "a validation forward in training mode"
            seen.append(batch[:, 0].tolist())
            return SimpleNamespace(loss=value[batch[:, 0]].mean())

    reduced = []

    def all_reduce(t):  # rank 1 runs first: rank 0's all-reduce adds its total
        if reduced:
            t += reduced.pop()
        else:
            reduced.append(t.clone())

    monkeypatch.setattr(evaluate.dist, "all_reduce", all_reduce)
    logged = []
    cfg = SimpleNamespace(micro_batch_size=4, eval_windows=10, data_prefetch=prefetch, compile=False)  # read ahead or not
    for rank in (1, 0):
        t = SimpleNamespace(engine=Engine(), val_data=val_data, cfg=cfg, rank=rank, world=2, step=7,
                            pin_batches=False, metrics=SimpleNamespace(log=logged.append), _print=lambda msg: None)
        rec = trainer_mod.Trainer.evaluate(t)
        assert t.engine.training  # back in training mode for the next step
    assert seen == [[4, 5, 6, 7], [0], [0, 1, 2, 3], [8, 9]]  # rank 1's empty batch ran window 0, weightless
    assert rec["val_tokens"] == 10 * 8
    assert (True in read_by) == bool(prefetch)  # (the empty batch's stand-in window is read in the step)
    assert rec["val_loss"] == pytest.approx(value.mean().item(), rel=1e-12)  # 29.5, by hand: (285 + 10) / 10
    assert value.mean().item() == 29.5
    # The run's last evaluation reads final_eval_windows (the reference's reads 100M tokens): 6 windows spread
    # over the 10, j * 10 // 6 = 0, 1, 3, 5, 6, 8: (1 + 2 + 10 + 26 + 37 + 65) / 6 = 141 / 6 by hand; the
    # periodic ones keep eval_windows.
    cfg.final_eval_windows = 6
    for final, want in ((True, 141 / 6), (False, 29.5)):
        seen.clear()
        for rank in (1, 0):
            t = SimpleNamespace(engine=Engine(), val_data=val_data, cfg=cfg, rank=rank, world=2, step=7,
                                pin_batches=False, metrics=SimpleNamespace(log=logged.append),
                                _print=lambda msg: None)
            rec = trainer_mod.Trainer.evaluate(t, final=final)
        assert rec["val_loss"] == pytest.approx(want, rel=1e-12), final


def test_a_mixtures_evaluation_reports_each_members_loss_over_its_windows(monkeypatch):
    """On a mixture (relora_ds.data.MixedWindows) Trainer.evaluate logs val_loss (all evaluated windows, each
    once) and val_loss/<member> (the member's windows among them, each once, as often as the mixture holds
    it): 2 stub ranks, micro-batches of 2, a stub engine whose loss is the batch's mean of known per-window
    values. Oracle: those values averaged by hand over the windows the mixture maps the spread positions to."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from relora_ds import evaluate
    from relora_ds import trainer as trainer_mod
    from relora_ds.data.mixture import MixedWindows

    def value(source, window):
        return float(10 * source + window * window + 1)

    class Source:
        def __init__(self, source, size):
            self.source, self.size, self.seq_len = source, size, 4

        def __len__(self):
            return self.size

        def get_batch(self, idx):
            idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
            out = idx[:, None].repeat(1, 5)
            out[:, 0] = self.source
            return out

        def __getitem__(self, i):
            return self.get_batch([i])[0]

    mix = MixedWindows([Source(0, 4), Source(1, 6)], [1, 1], seed=2, names=["../data/c4", "../data/code"])

    class Engine:
        device = "cpu"

        def __init__(self):
            self.calls = 0

        def eval(self):
            pass

        def train(self):
            pass

        def __call__(self, batch, labels):
            self.calls += 1  # every rank must run as many forwards (ZeRO-3's gathers are collectives)
            return SimpleNamespace(loss=torch.tensor([value(int(r[0]), int(r[1])) for r in batch]).mean())

    reduced = []

    def all_reduce(t):
        if reduced:
            t += reduced.pop()
        else:
            reduced.append(t.clone())
    monkeypatch.setattr(evaluate.dist, "all_reduce", all_reduce)
    # all 10; 7 spread; 1 (only member c4 is read: code's losses are absent, not NaN, and rank 1's share is
    # empty, a weightless forward)
    for windows in (None, 7, 1):
        cfg = SimpleNamespace(micro_batch_size=2, eval_windows=windows, data_prefetch=0, final_eval_windows=None,
                              compile=False)
        logged, calls = [], []
        for rank in (1, 0):
            t = SimpleNamespace(engine=Engine(), val_data=mix, cfg=cfg, rank=rank, world=2, step=3, pin_batches=False,
                                metrics=SimpleNamespace(log=logged.append), _print=lambda msg: None)
            rec = trainer_mod.Trainer.evaluate(t)
            calls.append(t.engine.calls)
        assert calls[0] == calls[1] > 0, (windows, calls)
        n = windows or 10
        member, window = mix.locate(np.arange(n) * 10 // n)
        values = [value(int(s), int(w)) for s, w in zip(member, window)]
        by_member = {label: [v for s, v in zip(member, values) if s == m] for m, label in enumerate(("c4", "code"))}
        assert rec["val_loss"] == pytest.approx(sum(values) / n, rel=1e-12)
        assert {k: v for k, v in rec.items() if k.startswith("val_loss/")} == pytest.approx(
            {f"val_loss/{k}": sum(v) / len(v) for k, v in by_member.items() if v}, rel=1e-12)
        assert rec["val_tokens"] == n * 4
        assert (windows == 1) == (not by_member["code"])


def test_evaluate_script_equals_transformers_on_a_data_dir_and_a_mixture(tmp_path):
    """launch/evaluate.py on an exported model: its loss (the token-weighted mean over the windows spread over
    the validation split) against transformers' own LlamaForCausalLM computing each window's loss from the
    same directory; on a mixture each member's loss too, and a data dir the model cannot embed is refused."""
    import json
    import subprocess
    import sys

    import torch
    import transformers

    from launch_utils import ROOT, launch_env
    from relora_ds import LlamaConfig, LlamaForCausalLM
    from relora_ds.data import PackedTokens, make_mixture, open_split
    from relora_ds.hf import export_hf
    from trainer_utils import packed_data_dir

    torch.manual_seed(0)
    export_hf(LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512)), tmp_path / "hf", dtype=torch.float32,
              token_ids={"bos_token_id": 1, "eos_token_id": 2})
    a = packed_data_dir(tmp_path / "a", 2_000, 1_200, corpus="corpus-a")
    b = packed_data_dir(tmp_path / "b", 2_000, 700, corpus="corpus-b")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()

    def by_hand(data_dir, positions):
        val = PackedTokens(data_dir, "validation", seq_len=32)
        with torch.no_grad():
            return [hf(w[None], labels=w[None]).loss.item() for w in val.get_batch(positions)]

    def run(data_dir, *extra):
        proc = subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), str(tmp_path / "hf"), "--data-dir",
                               str(data_dir), "--seq-len", "32", "--micro-batch-size", "3", *extra],
                              capture_output=True, text=True, env=launch_env(), cwd=ROOT)
        return proc, (json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None)

    proc, got = run(a, "--windows", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = by_hand(a, [j * 37 // 10 for j in range(10)])  # 1,199 // 32 = 37 windows, 10 spread over them
    assert got["windows"] == 10 and got["tokens"] == 10 * 32
    assert got["loss"] == pytest.approx(sum(want) / 10, rel=1e-5)
    mix = make_mixture([(a, 1), (b, 1)], tmp_path / "mix")
    proc, got = run(mix)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 37 + 21 = 58 windows, equal weights: 29 positions each (a: 29 of its 37; b: its 21, and 8 of them again)
    mixed = open_split(mix, "validation", seq_len=32)
    assert mixed.quotas.tolist() == [29, 29]
    member, window = mixed.locate(range(len(mixed)))
    per = {name: by_hand(d, window[member == m]) for m, (name, d) in enumerate((("a", a), ("b", b)))}
    assert got["loss/a"] == pytest.approx(sum(per["a"]) / len(per["a"]), rel=1e-5)
    assert got["loss/b"] == pytest.approx(sum(per["b"]) / len(per["b"]), rel=1e-5)
    assert got["loss"] == pytest.approx(sum(per["a"] + per["b"]) / len(mixed), rel=1e-5)
    big = packed_data_dir(tmp_path / "big", 2_000, 700, vocab=1024, corpus="corpus-c")
    proc, _ = run(big)
    assert proc.returncode == 2 and "tokenizer has 1024 ids" in proc.stderr and "embeds 512" in proc.stderr
