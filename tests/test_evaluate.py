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


def test_a_mixtures_evaluation_reads_each_member_on_its_own_and_weights_their_losses(monkeypatch):
    """On a mixture (relora_ds.data.MemberSplits) Trainer.evaluate logs val_loss/<member> over windows spread
    evenly over the member's own split, as that dir alone would be evaluated, and val_loss, the members'
    losses weighted by the mixture's weights (it was the epoch-0 mixture's windows: some members' windows
    read several times, others' partly, a user trial found on 2026-12-05). 2 stub ranks, micro-batches of 2,
    a stub engine whose loss is the batch's mean of known per-window values; sizes 4 and 6, weights 3:1.
    Oracle, by hand: windows None reads 4 and 6; 7 shares out 5.25/1.75 -> 5/2 (largest remainder), capped
    at member 0's 4; 1 -> 1/0, at least one each -> 1/1."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from relora_ds import evaluate
    from relora_ds import trainer as trainer_mod
    from relora_ds.data.mixture import MemberSplits

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

    mix = MemberSplits([Source(0, 4), Source(1, 6)], [3, 1], names=["../data/c4", "../data/code"])

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
    for windows, counts in ((None, (4, 6)), (7, (4, 2)), (1, (1, 1))):
        cfg = SimpleNamespace(micro_batch_size=2, eval_windows=windows, data_prefetch=0, final_eval_windows=None,
                              compile=False)
        logged, calls = [], []
        for rank in (1, 0):
            t = SimpleNamespace(engine=Engine(), val_data=mix, cfg=cfg, rank=rank, world=2, step=3, pin_batches=False,
                                metrics=SimpleNamespace(log=logged.append), _print=lambda msg: None)
            rec = trainer_mod.Trainer.evaluate(t)
            calls.append(t.engine.calls)
        assert calls[0] == calls[1] > 0, (windows, calls)
        member = {label: np.mean([value(m, j * size // n) for j in range(n)])  # spread as eval_batches spreads
                  for m, (label, size, n) in enumerate(zip(("c4", "code"), (4, 6), counts))}
        assert {k: v for k, v in rec.items() if k.startswith("val_loss/")} == pytest.approx(
            {f"val_loss/{k}": v for k, v in member.items()}, rel=1e-12)
        assert rec["val_loss"] == pytest.approx(0.75 * member["c4"] + 0.25 * member["code"], rel=1e-12)
        assert rec["val_tokens"] == sum(counts) * 4


def test_evaluate_script_equals_transformers_on_a_data_dir_and_a_mixture(tmp_path):
    """launch/evaluate.py on an exported model: its loss (the token-weighted mean over the windows spread over
    the validation split) against transformers' own LlamaForCausalLM computing each window's loss from the
    same directory; on a mixture each member's loss over its own windows and the weighted mixture, and a data
    dir the model cannot embed is refused."""
    import json
    import math
    import re

    import torch
    import transformers

    from launch_utils import ROOT, launch_env, run_python
    from relora_ds import LlamaConfig, LlamaForCausalLM
    from relora_ds.data import PackedTokens, make_mixture
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
        proc = run_python(ROOT / "launch/evaluate.py", tmp_path / "hf", "--data-dir", data_dir, "--seq-len", "32",
                          "--micro-batch-size", "3", *extra, env=launch_env())
        return proc, (json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None)

    proc, got = run(a, "--windows", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = by_hand(a, [j * 37 // 10 for j in range(10)])  # 1,199 // 32 = 37 windows, 10 spread over them
    assert got["windows"] == 10 and got["tokens"] == 10 * 32
    assert got["loss"] == pytest.approx(sum(want) / 10, rel=1e-5)
    assert got["loss"] > 5 and got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)  # ~ln 512: untrained
    # A mixture: each member's loss over its own windows, what the dir alone gives (a: 37 windows, b: 21), and
    # the mixture's the members' weighted 3:1; --windows 10 shares out 7.5/2.5 -> 8/2, spread over each member.
    mix = make_mixture([(a, 3), (b, 1)], tmp_path / "mix")
    alone = {name: by_hand(d, range(n)) for name, d, n in (("a", a, 37), ("b", b, 21))}
    for extra, counts in (((), {"a": 37, "b": 21}), (("--windows", "10"), {"a": 8, "b": 2})):
        proc, got = run(mix, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        per = {name: [alone[name][j * len(alone[name]) // n] for j in range(n)] for name, n in counts.items()}
        assert got["loss/a"] == pytest.approx(sum(per["a"]) / len(per["a"]), rel=1e-5)
        assert got["loss/b"] == pytest.approx(sum(per["b"]) / len(per["b"]), rel=1e-5)
        assert got["loss"] == pytest.approx(0.75 * got["loss/a"] + 0.25 * got["loss/b"], rel=1e-12)
        assert got["windows"] == sum(counts.values()) and got["tokens"] == 32 * got["windows"]
    proc, got_a = run(a)
    assert got_a["loss"] == pytest.approx(sum(alone["a"]) / 37, rel=1e-5)
    # More windows than the split holds: all of them, said on stderr (it went unsaid), the same loss.
    proc, got = run(a, "--windows", "50")
    assert got == {**got_a, "seconds": got["seconds"]}
    assert re.search(r"--windows 50 but the validation split of \S+ holds 37 windows: the evaluation uses all 37",
                     proc.stderr), proc.stderr
    proc, got = run(mix, "--windows", "100")  # shares 75/25 of members holding 37/21
    assert got["windows"] == 58 and "--windows 100 shared out by the weights of mixture" in proc.stderr
    assert re.search(r"a \(37 windows for its share of 75\), \S+b \(21 windows for its share of 25\) than their "
                     r"validation splits hold: the evaluation reads all of theirs, 58 windows in all", proc.stderr), \
        proc.stderr
    proc, _ = run(a, "--windows", "0")
    assert proc.returncode == 2 and "--windows: must be a positive whole number, got 0" in proc.stderr, proc.stderr
    from relora_ds.evaluate import validation_losses
    for bad in (0, -1, 2.0):  # the API's own check, before any engine call
        with pytest.raises(ValueError, match=rf"num_windows={bad!r} must be a positive int or None"):
            validation_losses(None, None, 3, 0, 1, bad)
    big = packed_data_dir(tmp_path / "big", 2_000, 700, vocab=1024, corpus="corpus-c")
    proc, _ = run(big)
    assert proc.returncode == 2 and "tokenizer has 1024 ids" in proc.stderr and "embeds 512" in proc.stderr


def test_evaluate_script_masks_documents_as_the_run_trained(tmp_path):
    """A run trained with --document-masking records it in its export (relora_ds_progress.json), and
    launch/evaluate.py then attends within documents (auto; --document-masking on/off overrides): it used to
    evaluate such a run unmasked, so its loss was not the run's val_loss (a user trial, 2026-12-05). Oracle:
    transformers' LlamaForCausalLM run on each document of a window alone (RoPE is relative: alone, a document
    gets the logits the mask gives it inside the window), the window's loss over those logits."""
    import json

    import numpy as np
    import torch
    import transformers

    from launch_utils import ROOT, launch_env, run_python
    from relora_ds import LlamaConfig, LlamaForCausalLM
    from relora_ds.hf import PROGRESS_FILE, export_hf
    from trainer_utils import packed_data_dir

    torch.manual_seed(0)
    export_hf(LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512)), tmp_path / "hf", dtype=torch.float32,
              token_ids={"bos_token_id": 1, "eos_token_id": 2})
    data = packed_data_dir(tmp_path / "d", 2_000, 4 * 32 + 1)
    tokens = np.fromfile(data / "validation.bin", dtype=np.uint16)
    tokens[tokens == 2] = 3
    tokens[[5, 11, 40, 41, 70, 99, 100, 120]] = 2  # documents of 1 to 29 tokens, some across two windows
    tokens.tofile(data / "validation.bin")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()

    def by_hand(masked):
        losses = []
        with torch.no_grad():
            for k in range(4):
                w = torch.from_numpy(tokens[k * 32:k * 32 + 33].astype(np.int64))
                ends = (torch.nonzero(w == 2).flatten() + 1).tolist() if masked else []
                cuts = [0, *[e for e in ends if e < 33], 33]
                logits = torch.cat([hf(w[lo:hi][None]).logits[0] for lo, hi in zip(cuts, cuts[1:]) if hi > lo])
                losses.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:]).item())
        return sum(losses) / 4

    def run(*extra):
        proc = run_python(ROOT / "launch/evaluate.py", tmp_path / "hf", "--data-dir", data, "--seq-len", "32", *extra,
                          env=launch_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.splitlines()[-1])

    plain, masked = by_hand(False), by_hand(True)
    assert abs(plain - masked) > 1e-3  # the mask matters on this data
    got = run()  # an export without the record (another tool's): unmasked
    assert not got["document_masking"] and got["loss"] == pytest.approx(plain, rel=1e-5)
    (tmp_path / "hf" / PROGRESS_FILE).write_text(json.dumps({"step": 4}))  # an export from before the record
    proc = run_python(ROOT / "launch/evaluate.py", tmp_path / "hf", "--data-dir", data, "--seq-len", "32",
                      env=launch_env())
    assert proc.returncode == 0 and "predates the record of --document-masking" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["loss"] == pytest.approx(plain, rel=1e-5)
    (tmp_path / "hf" / PROGRESS_FILE).write_text(json.dumps({"document_masking": True}))
    got = run()
    assert got["document_masking"] and got["loss"] == pytest.approx(masked, rel=1e-5)
    assert run("--document-masking", "off")["loss"] == pytest.approx(plain, rel=1e-5)


def test_evaluate_script_names_a_bad_device_and_takes_no_abbreviated_flags(capsys):
    """--device foo was torch's RuntimeError traceback; --seq 8 was taken as --seq-len (the trainer, export and
    prepare_data take no abbreviations either)."""
    import sys

    import pytest
    import torch

    from launch_utils import ROOT
    sys.path.insert(0, str(ROOT / "launch"))
    import evaluate as script

    base = ["run/hf", "--data-dir", "data", "--seq-len", "8"]
    assert script.parse_args([*base, "--device", "cpu"]).device == torch.device("cpu")
    for argv, error in (([*base, "--device", "foo"], "argument --device: 'foo' is not a torch device"),
                        (["run/hf", "--data-dir", "data", "--seq", "8"], "the following arguments are required: "
                                                                         "--seq-len"),
                        # a review: a directory for --out failed after the whole evaluation (IsADirectoryError), and
                        # a device this torch lacks with torch's AssertionError
                        ([*base, "--out", str(ROOT)], f"--out {ROOT} is a directory: give a file"),
                        *([([*base, "--device", "cuda"], "--device cuda: torch here has no cuda device")]
                          if not torch.cuda.is_available() else [])):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert error in capsys.readouterr().err


def test_eval_windows_0_reads_the_whole_split_and_a_diverged_loss_still_logs(monkeypatch):
    """eval_windows 0 (and final_eval_windows 0) is the whole split, as TrainConfig documents; a diverged run's
    validation loss (1,004.5 here) is logged with its perplexity capped at e^50, not an OverflowError out of
    math.exp that stopped the run at its evaluation. Oracle: the mean of the 10 windows' values, by hand.
    (A mutation trial's survivors: 0 passed on as a window count, the perplexity uncapped.) One rank, a stub
    engine whose loss is a batch's mean of known per-window values."""
    import math
    from types import SimpleNamespace

    import torch

    from relora_ds import evaluate
    from relora_ds import trainer as trainer_mod

    value = torch.tensor([1000.0 + i for i in range(10)])
    windows = torch.zeros(10, 9, dtype=torch.long)
    windows[:, 0] = torch.arange(10)

    class Engine:
        device = "cpu"

        def eval(self):
            pass

        def train(self):
            pass

        def __call__(self, batch, labels):
            return SimpleNamespace(loss=value[batch[:, 0]].mean())

    monkeypatch.setattr(evaluate.dist, "all_reduce", lambda t: None)  # one rank
    for eval_windows, final_eval_windows, final in ((0, None, False), (0, None, True), (3, 0, True)):
        cfg = SimpleNamespace(micro_batch_size=4, eval_windows=eval_windows, final_eval_windows=final_eval_windows,
                              data_prefetch=0, compile=False)
        t = SimpleNamespace(engine=Engine(), val_data=windows, cfg=cfg, rank=0, world=1, step=7, pin_batches=False,
                            metrics=SimpleNamespace(log=lambda rec: None), _print=lambda msg: None)
        rec = trainer_mod.Trainer.evaluate(t, final=final)
        assert rec["val_tokens"] == 10 * 8 and rec["val_loss"] == pytest.approx(1004.5, rel=1e-12)
        assert rec["val_ppl"] == pytest.approx(math.exp(50.0), rel=1e-12)


def test_evaluate_script_writes_strict_json_for_a_diverged_model(tmp_path, monkeypatch, capsys):
    """Found by a review: a non-finite loss was printed (and written to --out) as a bare NaN, which is not JSON
    (RFC 8259; strict parsers refuse it). It is null, as in metrics.jsonl, and said on stderr."""
    import importlib.util
    import json

    from launch_utils import ROOT

    spec = importlib.util.spec_from_file_location("evaluate_py_under_test", ROOT / "launch/evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "evaluate", lambda args: {"loss": float("nan"), "ppl": float("nan"),
                                                          "loss/a": float("inf"), "tokens": 64})
    assert script.main([str(tmp_path / "hf"), "--data-dir", str(tmp_path), "--seq-len", "32",
                        "--out", str(tmp_path / "eval.json")]) == 0
    out, err = capsys.readouterr()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    for line in (out.splitlines()[-1], (tmp_path / "eval.json").read_text()):
        assert json.loads(line, parse_constant=refuse) == {"loss": None, "ppl": None, "loss/a": None, "tokens": 64}
    assert "the loss is nan (the model's outputs are not finite); written as null" in err
