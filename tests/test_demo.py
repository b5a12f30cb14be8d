"""The README's main job, shortened: deepspeed launcher, 2 ranks, the DeepSpeed config demo.sh picks
(zero2.json in bf16, zero2_fp32.json on a CPU without native bf16), tiny recipe, built-in corpus. Then errors
that must stop a run before its first step."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_utils import ROOT, free_port, launch_env, run_deepspeed, run_python

SHORT = ["--total-steps", "50", "--warm-start-steps", "14", "--cycle-length", "12", "--restart-warmup-steps", "4",
         "--warmup-steps", "7", "--eval-every", "25", "--eval-windows", "32", "--save-every", "25",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-len", "64"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    ds = subprocess.run([sys.executable, "scripts/demo_plan.py"], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.split("\n")[2]
    run_deepspeed(ROOT / "launch/train.py", "--config", ROOT / "launch/configs/tiny.yaml", "--deepspeed",
                  ROOT / ds, *SHORT, "--output-dir", out)
    return out


def test_demo_warm_start_resets_eval_checkpoint_export(demo_run):
    recs = [json.loads(l) for l in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "switch_to_relora" and r["step"] == 14 for r in recs)
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [26, 38, 50]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [25, 50] and val[-1]["val_loss"] < val[0]["val_loss"]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 50 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert (demo_run / "checkpoints" / "latest").read_text() == "step_50"
    assert (demo_run / "tensorboard").is_dir()


def test_export_loads_in_transformers_and_predicts(demo_run):
    import transformers

    from relora_ds.data import PackedTokens, builtin_data_dir

    hf = transformers.LlamaForCausalLM.from_pretrained(demo_run / "hf").eval()
    val = PackedTokens(builtin_data_dir(2048), "validation", seq_len=64)
    batch = torch.stack([val[i] for i in range(4)])
    with torch.no_grad():
        loss = hf(batch, labels=batch).loss.item()
    recs = [json.loads(l) for l in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert loss < math.log(2048) - 1.0  # far better than uniform: the trained weights were exported
    assert abs(loss - [r for r in recs if "val_loss" in r][-1]["val_loss"]) < 0.5


def test_plot_command(demo_run):
    subprocess.run([sys.executable, str(ROOT / "launch/plot_metrics.py"), str(demo_run / "metrics.jsonl")],
                   check=True, capture_output=True)
    assert (demo_run / "curves.png").stat().st_size > 10_000


def test_plot_curves_of_a_resumed_run_keep_one_record_per_step():
    sys.path.insert(0, str(ROOT / "launch"))
    from plot_metrics import curves

    first = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 9)] + [{"event": "reset", "step": 6}]
    resumed = [{"step": s, "loss": 4.0 - 0.1 * s, "lr": 1e-3} for s in range(7, 11)] + [{"event": "reset", "step": 10}]
    train, val, resets = curves(first + resumed + [{"step": 10, "val_loss": 3.5}])
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["loss"] for r in train][6:] == [4.0 - 0.1 * s for s in range(7, 11)]  # the resumed run's
    assert resets == [6, 10] and [r["step"] for r in val] == [10]


def test_plot_a_killed_runs_metrics_with_a_cut_last_line(tmp_path, capsys):
    """A job killed mid-write leaves half a JSON line (metrics.py moves it aside only on resume): the plot
    skips it and says so; a missing output directory is named."""
    sys.path.insert(0, str(ROOT / "launch"))
    import plot_metrics

    recs = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "0\n" + '{"step": 6, "loss": 4.')
    out = plot_metrics.main([str(path)])  # (a line of JSON that is no record, "0": an AttributeError)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 0
    assert "skipped 2 line(s) that are not complete JSON records" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plot_metrics.main([str(path), "-o", str(tmp_path / "missing" / "c.png")])
    assert "no directory" in capsys.readouterr().err
    assert plot_metrics.main([str(tmp_path)]) == out  # a run's output_dir: its metrics.jsonl (a test-drive's try)
    # -o: a directory gets curves.png in it, a name without suffix .png, and the path printed is the file
    # written (a review found "wrote DIR" where matplotlib wrote DIR.png beside it)
    (tmp_path / "plots").mkdir()
    for arg, want in (("plots", "plots/curves.png"), ("noext", "noext.png"), ("c.svg", "c.svg")):
        got = plot_metrics.main([str(path), "-o", str(tmp_path / arg)])
        assert got == tmp_path / want and got.is_file() and f"wrote {got}" in capsys.readouterr().out, arg
    assert not (tmp_path / "plots.png").exists()
    # A new directory named with a trailing slash is created, not written as new.png beside it.
    got = plot_metrics.main([str(path), "-o", str(tmp_path / "new") + "/"])
    assert got == tmp_path / "new" / "curves.png" and got.is_file() and not (tmp_path / "new.png").exists()
    with pytest.raises(SystemExit):
        plot_metrics.main([str(path), "-o", str(tmp_path / "c.xyz")])
    assert "'.xyz' is not an image format matplotlib writes; valid: " in capsys.readouterr().err


def test_demo_help_prints_usage_and_launches_nothing():
    proc = subprocess.run(["bash", "scripts/demo.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env=launch_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: bash scripts/demo.sh") and "--total-steps" in proc.stdout
    assert "launcher" not in proc.stderr and "world_size" not in proc.stderr  # no deepspeed launch, no rank


def _python_train(*args):
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return run_python(ROOT / "launch/train.py", *args, env=env, timeout=300)


def test_resume_with_another_model_is_a_clear_error(demo_run, tmp_path):
    proc = _python_train("--config", ROOT / "launch/configs/tiny.yaml", *SHORT, "--output-dir", demo_run,
                         "--resume", "--model", "debug")
    assert proc.returncode != 0 and "is of another model" in proc.stderr + proc.stdout
    # 2 ranks of ZeRO-2 into 1 rank without ZeRO: DeepSpeed cannot load sharded state into a ZeRO-0 engine.
    proc = _python_train("--config", ROOT / "launch/configs/tiny.yaml", *SHORT, "--output-dir", demo_run, "--resume")
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "this run has 1 rank(s) and ZeRO stage 0" in out and "zero2.json" in out, out[-3000:]


def test_tokenizer_larger_than_model_vocab_is_a_clear_error(tmp_path):
    import relora_ds

    relora_ds.export_hf(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=300)),
                        tmp_path / "hf300")
    proc = _python_train("--config", ROOT / "launch/configs/tiny.yaml", *SHORT, "--hf-model", tmp_path / "hf300",
                         "--output-dir", tmp_path / "run")
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "error:" in out and "300" in out and "2048" in out, out[-2000:]


def test_export_any_checkpoint_offline(demo_run, tmp_path):
    import transformers

    for tag in ("step_25", "step_50"):
        run_python(ROOT / "launch/export.py", demo_run / "checkpoints", "--tag", tag, "--out", tmp_path / tag,
                   env=launch_env(), check=True)
    final = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "step_50").eval()
    trainer_export = transformers.LlamaForCausalLM.from_pretrained(demo_run / "hf").eval()
    mid = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "step_25").eval()
    x = torch.randint(0, 2048, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(final(x).logits, trainer_export(x).logits, atol=1e-4, rtol=0)
        assert (mid(x).logits - final(x).logits).abs().max() > 1e-2  # a different point of the run


def test_export_names_damaged_checkpoints_and_takes_a_run_dir(demo_run, tmp_path):
    """launch/export.py on a copy of the demo's checkpoints: the run directory itself is taken for its
    checkpoints/, and one checkpoint's directory for that checkpoint; a checkpoint without config.json, one missing a DeepSpeed file, and an --out that is a file
    are one-line errors (exit 2), not tracebacks."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run / "checkpoints", run / "checkpoints")
    export = lambda *a: run_python(ROOT / "launch/export.py", *a, env=launch_env())  # noqa: E731
    proc = export(run, "--tag", "step_50", "--out", tmp_path / "hf", "--no-tokenizer")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = export(run / "checkpoints" / "step_50", "--out", tmp_path / "hf2", "--no-tokenizer")  # one checkpoint's dir
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint from before the merge_count buffers (their keys taken out of its model states) exports the
    # same weights, its merge record unknown rather than refused.
    shutil.copytree(run / "checkpoints" / "step_50", tmp_path / "older" / "step_50")
    for f in (tmp_path / "older" / "step_50").glob("*model_states.pt"):
        states = torch.load(f, weights_only=False)
        dropped = [k for k in states["module"] if k.endswith("merge_count")]
        assert dropped or "zero_pp_rank" in f.name, f.name
        states["module"] = {k: v for k, v in states["module"].items() if k not in dropped}
        torch.save(states, f)
    proc = export(tmp_path / "older" / "step_50", "--out", tmp_path / "hf_older", "--no-tokenizer")
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = load_file(tmp_path / "hf_older" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((tmp_path / "hf_older" / "relora_ds_progress.json").read_text())["relora"] is None
    assert json.loads((tmp_path / "hf" / "relora_ds_progress.json").read_text())["relora"] is not None
    # Without a tokenizer, the BOS/EOS ids are still the run's (from its data manifest), as the trainer's
    # export with the tokenizer says them.
    ids = lambda d: [json.loads((d / "config.json").read_text())[k] for k in ("bos_token_id", "eos_token_id")]  # noqa: E731
    assert ids(tmp_path / "hf") == ids(demo_run / "hf") and None not in ids(tmp_path / "hf")
    # A run started elsewhere with a relative data dir (checkpoints before 2026-12-03 recorded it as typed;
    # now the trainer records it absolute): taken from the run's recorded cwd, not the exporter's.
    cfg_file = run / "checkpoints" / "step_50" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    data_dir = Path(cfg["data_dir"])
    assert data_dir.is_absolute()
    cfg["data_dir"], cfg["environment"]["cwd"] = str(data_dir.relative_to(data_dir.parent.parent)), str(data_dir.parent.parent)
    cfg_file.write_text(json.dumps(cfg))
    proc = export(run, "--tag", "step_50", "--out", tmp_path / "hf3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf3" / "tokenizer.json").read_text() == (demo_run / "hf" / "tokenizer.json").read_text()
    del cfg["environment"]["cwd"]  # an older run_info: the path is read from here, and the error says so
    cfg_file.write_text(json.dumps(cfg))
    proc = export(run, "--tag", "step_50", "--out", tmp_path / "hf4")
    assert proc.returncode == 2 and f"data dir {cfg['data_dir']!r}, from {ROOT}" in proc.stderr, proc.stderr
    assert "no prepared data (manifest.json) there); pass --tokenizer PATH" in proc.stderr
    cfg_file.write_text(json.dumps({**cfg, "data_dir": str(data_dir)}))
    (tmp_path / "afile").write_text("x")
    proc = export(run / "checkpoints", "--out", tmp_path / "afile")
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr
    for given, what in ((tmp_path / "no_such_run", "does not exist"), (tmp_path / "afile", "is a file")):
        proc = export(given, "--out", tmp_path / "z")  # was: "no checkpoint (latest) in <it>; found: none"
        assert proc.returncode == 2 and f"{given} {what}: give a run's output_dir, its checkpoints/ folder, or " \
            "one checkpoint's step_N/ folder" in proc.stderr, proc.stderr
    # A run's hf/ export given by mistake (a review: the error was about the run's tokenizer)
    proc = export(demo_run / "hf", "--out", tmp_path / "z")
    assert proc.returncode == 2 and f"{demo_run / 'hf'} is a Hugging Face model directory (llama): its config.json " \
        "has no 'train' and 'model' sections" in proc.stderr, proc.stderr
    # A Hugging Face Trainer's checkpoint-N (its weights the wrapped model's): the error said from_pretrained
    # loads it, which drops scale·B·A; it names the ways that export it (ZeRO-3's holds no config.json)
    hf_ckpt = tmp_path / "trainer_out" / "checkpoint-5"
    hf_ckpt.mkdir(parents=True)
    (hf_ckpt / "trainer_state.json").write_text("{}")
    for given, tag in ((hf_ckpt, ()), (hf_ckpt.parent, ("--tag", "checkpoint-5"))):
        proc = export(given, *tag, "--out", tmp_path / "z")
        assert proc.returncode == 2 and f"{hf_ckpt} is a Hugging Face Trainer checkpoint (trainer_state.json)" in \
            proc.stderr and "trainer.save_model(out)" in proc.stderr, proc.stderr
    # --out into the run's checkpoints (a review: the export replaced step_50's config.json, and no resume or
    # export could load that checkpoint again), or into the run's output_dir: refused, nothing written
    before = (run / "checkpoints" / "step_50" / "config.json").read_bytes()
    for out in (run / "checkpoints" / "step_50", run / "checkpoints", run / "checkpoints" / "new", run):
        proc = export(run, "--tag", "step_50", "--out", out)
        assert proc.returncode == 2 and f"--out {out} is a run's output_dir, its checkpoints/ folder or a checkpoint " \
            "in it" in proc.stderr, proc.stderr
    assert (run / "checkpoints" / "step_50" / "config.json").read_bytes() == before
    assert not (run / "checkpoints" / "new").exists()
    (run / "checkpoints" / "step_25" / "config.json").unlink()
    proc = export(run / "checkpoints", "--tag", "step_25", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "step_25 has no config.json: an incomplete checkpoint" in proc.stderr
    for f in (run / "checkpoints" / "step_50").glob("*model_states.pt"):
        f.unlink()
    proc = export(run / "checkpoints", "--tag", "step_50", "--out", tmp_path / "y")
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_export_refuses_a_tokenizer_the_run_was_not_trained_with(demo_run, tmp_path):
    """launch/export.py --tokenizer with another SentencePiece model than the run's is refused (exit 2, naming
    "is not the tokenizer" and the sha256 the checkpoint recorded), and writes nothing; the run's own tokenizer
    given the same way is taken. Oracle: the sha256 of the data dir's tokenizer.model, computed here with
    hashlib, is what the checkpoint's config.json records (a mutation trial found the check untested)."""
    import hashlib
    import io

    import sentencepiece as spm

    from relora_ds.data import load_manifest

    cfg = json.loads((demo_run / "checkpoints" / "step_50" / "config.json").read_text())
    own = Path(load_manifest(cfg["data_dir"])["tokenizer_path"])
    assert cfg["tokenizer_sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    proto = io.BytesIO()
    lines = [f"line {i}: the quick brown fox {i * 7}" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=100, minloglevel=2)
    other = tmp_path / "other.model"
    other.write_bytes(proto.getvalue())
    export = lambda *a: run_python(ROOT / "launch/export.py", *a, env=launch_env())  # noqa: E731
    proc = export(demo_run / "checkpoints", "--tag", "step_50", "--out", tmp_path / "hf", "--tokenizer", other)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{other} is not the tokenizer" in proc.stderr
    assert f"(sha256 {cfg['tokenizer_sha256'][:12]}...)" in proc.stderr
    assert not (tmp_path / "hf").exists()
    proc = export(demo_run / "checkpoints", "--tag", "step_50", "--out", tmp_path / "hf", "--tokenizer", own)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == own.read_bytes()


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    proc = _python_train("--model", "debug", "--seq-len", "32", "--cycle-length", "4", "--warm-start-steps", "2",
                         "--restart-warmup-steps", "2", "--warmup-steps", "1", "--total-steps", "12",
                         "--lr", "1e20", "--grad-clip", "0", "--micro-batch-size", "4", "--global-batch-size", "4",
                         "--save-every", "2", "--eval-every", "0", "--rank", "4", "--vocab-size", "512",
                         "--output-dir", tmp_path / "run")
    assert proc.returncode == 3, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    last_good = (ckpts / "latest").read_text()
    assert f"non-finite loss (nan) at step {int(last_good.split('_')[1]) + 1}" in proc.stderr
    assert f"Last good checkpoint: {ckpts / last_good}" in proc.stderr and (ckpts / last_good).is_dir()
    # The steps before the NaN reached TensorBoard too (its writer is closed on this exit path as well).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "loss" in events.Tags()["scalars"] and len(events.Scalars("loss")) >= int(last_good.split("_")[1])


def test_readme_generation_snippet_runs_on_the_export(demo_run, capsys):
    """The README's generation example, on this run's export: its tokenizer loads and the model generates."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"The export generates text with\nits own tokenizer:\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    exec(compile(block.replace('"runs/tiny/hf"', repr(str(demo_run / "hf"))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed.strip()) > len("ROMEO:") + 20


def test_train_py_closes_the_metrics_on_an_error_exit(monkeypatch):
    """launch/train.py closes the metrics writer (TensorBoard flush, W&B's end) also when training stops on a NaN:
    the end-to-end NaN test above cannot tell, since TensorBoard flushed there anyway."""
    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_py

    closed = []

    class StopsOnNaN:
        def __init__(self, cfg, ds_config_path, early_stop=None):
            self.metrics = type("Metrics", (), {"close": lambda _, exit_code=0: closed.append(exit_code)})()

        def start(self):  # the engine (built; nothing to refuse here)
            pass

        def train(self):
            raise FloatingPointError("non-finite loss (nan) at step 3")

        def close(self):  # the output_dir lock and the signal handlers
            closed.append("released")

    monkeypatch.setattr(train_py, "Trainer", StopsOnNaN)
    assert train_py.main(["--model", "debug", "--cycle-length", "4", "--total-steps", "8", "--warmup-steps", "2"]) == 3
    assert closed == [3, "released"]  # with the exit status (W&B marks the run failed), then the lock


@pytest.mark.parametrize("argv, out, extra", [
    ([], "runs/tiny", ["--overwrite"]),
    (["--total-steps", "200"], "runs/tiny", ["--overwrite"]),
    (["--resume"], "runs/tiny", []),
    (["--resume-from", "step_200"], "runs/tiny", []),  # implies resume: with --overwrite train.py refuses both
    (["--resume-from=step_200"], "runs/tiny", []),
    (["--overwrite"], "runs/tiny", []),  # given once, not twice
    (["--no-overwrite"], "runs/tiny", []),
    (["--output-dir", "runs/mine"], "runs/mine", []),  # someone's own run is never deleted implicitly
    (["--output-dir=runs/mine", "--no-resume"], "runs/mine", []),
    (["--config", "launch/configs/paper_60m.yaml"], "runs/paper-60m", []),  # another recipe's run: never implied
    (["--output-dir", "runs/tiny"], "runs/tiny", ["--overwrite"]),  # the demo's own dir, however named
])
def test_demo_plan_adds_overwrite_only_to_a_fresh_run_in_its_own_dir(argv, out, extra, monkeypatch):
    # scripts/demo_plan.py's plan() in this process (its command line runs in the tests below): paths as
    # demo.sh sees them, from the repository root.
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.chdir(ROOT)
    import demo_plan

    assert demo_plan.plan(argv) == (out, extra)
    if extra:  # what demo.sh then launches is a valid command line: no flag added twice or contradicted
        assert demo_plan.plan([*argv, *extra]) == (out, [])


def test_demo_plan_names_a_bad_flag_combination_before_any_launch():
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--resume", "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "give resume or overwrite, not both" in proc.stderr


def test_demo_plan_never_overwrites_the_run_of_a_users_recipe(tmp_path):
    """A user's --config naming its own output_dir (a run with checkpoints there): no --overwrite."""
    recipe = (ROOT / "launch/configs/tiny.yaml").read_text()
    assert "output_dir: runs/tiny" in recipe
    mine = tmp_path / "my.yaml"
    mine.write_text(recipe.replace("output_dir: runs/tiny", f"output_dir: {tmp_path / 'important'}"))
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--config", str(mine)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[:2] == [str(tmp_path / "important"), ""]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_demo_plan_trains_fp32_on_a_cpu_without_native_bf16(monkeypatch, capsys, native_bf16):
    """The third line: zero2.json (bf16) where bf16 matmuls are native, zero2_fp32.json (said on stderr) on a
    GPU-less machine whose CPU would take PyTorch's bf16 fallback; a --deepspeed given is kept either way."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_plan

    from relora_ds import ds_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ds_machine, "cpu_has_native_bf16", lambda: native_bf16)
    assert demo_plan.ds_config(["--total-steps", "200"]) == ("ds_configs/zero2.json" if native_bf16
                                                             else "ds_configs/zero2_fp32.json")
    assert ("trains in fp32" in capsys.readouterr().err) == (not native_bf16)
    assert demo_plan.ds_config(["--deepspeed", "ds_configs/zero3.json"]) == "ds_configs/zero3.json"
    assert (ROOT / "ds_configs/zero2_fp32.json").is_file()
