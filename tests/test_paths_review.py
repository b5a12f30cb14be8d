"""Awkward paths through the user pipeline (a review): spaces, Unicode, a quote, '$HOME', '#', '[...]', '?' and a
leading '~' in the names prepare_data, launch/train.py and the launch tools are given. Oracles: the same corpus
from a plain path (prepared tokens byte for byte), the trainer's own export (launch/export.py's weights) and the
tools run on plain paths."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch_utils import ROOT, launch_env, run_python
from trainer_utils import read_losses, rewind_to, train1, train2

from relora_ds.data import load_manifest, prepare_data
from relora_ds.data.inputs import plain_names

LINES = [f"the {w} cat sat on the {v} mat number {i}" for i, (w, v) in
         enumerate(zip(["red", "big", "old", "shy"] * 100, ["blue", "small", "new", "warm"] * 100))]
OTHER = [f"zeta eta theta {i} omega" for i in range(500)]


def _prepared(out):
    return [(out / f"{split}.bin").read_bytes() for split in ("train", "validation")]


@pytest.mark.parametrize("folder, name, decoy", [("exp[1]", "c.txt", ("exp1", "c.txt")),
                                                 ("q", "a?b.txt", ("q", "axb.txt")),
                                                 ("$HOME x", "c.txt", None), ("c::d", "c.txt", None)])
def test_prepare_reads_the_file_named_whatever_its_path_holds(tmp_path, folder, name, decoy):
    """datasets reads data_files as patterns: 'exp[1]/c.txt' read 'exp1/c.txt' instead, 'a?b.txt' read 'axb.txt'
    too (other data, silently), '$HOME x' was expanded to '/root x' and 'c::d' split as a URL (both failed). The
    oracle: the same file prepared from a plain path gives the same tokens."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "c.txt").write_text("\n".join(LINES) + "\n")
    prepare_data([str(tmp_path / "plain" / "c.txt")], tmp_path / "want", vocab_size=300, txt_unit="line")
    if decoy is not None:
        (tmp_path / decoy[0]).mkdir(exist_ok=True)
        (tmp_path / decoy[0] / decoy[1]).write_text("\n".join(OTHER) + "\n")
    (tmp_path / folder).mkdir(exist_ok=True)
    shutil.copy(tmp_path / "plain" / "c.txt", tmp_path / folder / name)
    prepare_data([str(tmp_path / folder / name)], tmp_path / "got", vocab_size=300, txt_unit="line")
    assert _prepared(tmp_path / "got") == _prepared(tmp_path / "want")
    docs = {s: v["documents"] for s, v in load_manifest(tmp_path / "got")["splits"].items()}
    assert sum(docs.values()) == len(LINES), docs


def test_plain_names_link_only_what_datasets_would_misread(tmp_path):
    plain, odd = tmp_path / "a b é #'" / "c.jsonl", tmp_path / "x[1]" / "D.TXT.GZ"
    for f in (plain, odd):
        f.parent.mkdir()
        f.write_text("")
    names = plain_names([str(plain), str(odd)])
    assert names[0] == str(plain) and os.path.samefile(names[1], odd)
    assert names[1].endswith(".txt.gz") and "[" not in names[1]
    assert plain_names([str(plain)]) == [str(plain)]


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory):
    """prepare -> 2-rank training (exporting at its end) with the data and the run under
    'sp ace/données ü/it's/$HOME/#1'."""
    tmp = tmp_path_factory.mktemp("awkward")
    base = tmp / "sp ace" / "données ü" / "it's" / "$HOME" / "#1"
    base.mkdir(parents=True)
    (tmp / "c.txt").write_text("\n".join(LINES * 4) + "\n")
    prepare_data([str(tmp / "c.txt")], base / "data", vocab_size=300, txt_unit="line")
    train2(base, base / "data", export=True, save_every=6)
    assert sorted(read_losses(base / "run")[0]) == list(range(1, 13))
    return base


def _tool(script, *args, home, cwd):
    proc = run_python(ROOT / "launch" / script, *args, env={**launch_env(), "HOME": str(home)}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())


def test_the_tools_expand_a_leading_tilde_as_the_trainer_does(awkward_run, tmp_path):
    """export/evaluate/update_rank/plot_metrics given --out=~/... (which no shell expands) wrote into a folder
    named '~' in the working directory, where the trainer and prepare_data.py expand it. Oracles: the trainer's
    own export, and the tools on plain arguments."""
    run, data, home, cwd = awkward_run / "run", awkward_run / "data", tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    _tool("export.py", run, "--out=~/exp", home=home, cwd=cwd)
    _same_weights(home / "exp", run / "hf")
    ours = _tool("evaluate.py", "~/exp", f"--data-dir={data}", "--seq-len=32", "--windows=8", "--out=~/eval.json",
                 home=home, cwd=cwd)
    plain = _tool("evaluate.py", run / "hf", "--data-dir", data, "--seq-len=32", "--windows=8", home=home, cwd=cwd)
    loss = json.loads(plain.splitlines()[-1])["loss"]
    assert json.loads(ours.splitlines()[-1])["loss"] == loss == json.loads((home / "eval.json").read_text())["loss"]
    _tool("update_rank.py", "~/exp", run / "hf", "--json=~/ranks.json", home=home, cwd=cwd)
    ranks = json.loads((home / "ranks.json").read_text())["matrices"]
    assert ranks and all(r["rank"] == 0 for r in ranks.values())  # the same weights: no update
    _tool("plot_metrics.py", run, "-o=~/plots/", home=home, cwd=cwd)
    assert (home / "plots" / "curves.png").stat().st_size > 0
    assert not (cwd / "~").exists()


def test_a_run_under_a_folder_with_brackets_exports(awkward_run, tmp_path):
    """DeepSpeed's zero_to_fp32 finds the ranks' files with glob.glob(os.path.join(checkpoint_dir, pattern)): under
    'runs [v2]' it found none, and launch/export.py said the checkpoint had no *_model_states.pt."""
    moved = tmp_path / "runs [v2]" / "run"
    shutil.copytree(awkward_run / "run", moved, symlinks=True)
    _tool("export.py", moved, "--out", tmp_path / "exp", home=tmp_path, cwd=tmp_path)
    _same_weights(tmp_path / "exp", awkward_run / "run" / "hf")


def test_a_run_under_a_folder_with_brackets_resumes(awkward_run, tmp_path):
    """DeepSpeed's load_checkpoint finds the ranks' model-state files with glob.glob too (engine
    _get_all_ckpt_names), and so does its ds_to_universal in its input and output folders: under 'runs [v2]' a
    resume failed ("a file missing from it?"). Resumed at step 6 there on 1 rank (through the universal
    conversion; on 2 ranks it passed too, bit for bit): the losses of steps 7-12 are the uninterrupted run's."""
    before = read_losses(awkward_run / "run")[0]
    moved = tmp_path / "runs [v2]"
    shutil.copytree(awkward_run, moved, symlinks=True)
    rewind_to(moved / "run", "step_6")
    train1(moved, moved / "data", "--resume", save_every=6)
    after = read_losses(moved / "run")[0]
    assert sorted(after) == list(range(7, 13)), after
    # (another world size sums the gradients in another order)
    assert all(after[s] == pytest.approx(before[s], rel=1e-5) for s in after), (before, after)


def test_the_commands_an_error_suggests_paste_into_a_shell(tmp_path):
    """The command an error suggests names its paths quoted for a shell: "--out -x/sp ace ü/it's/data" pasted
    broke on the space and the quote. Oracle: shlex.split of the suggested command gives the path back."""
    import shlex

    from relora_ds.hf_load import load_hf_config

    odd = tmp_path / "sp ace ü" / "it's $HOME"
    odd.mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        load_manifest(odd)
    command = str(e.value).split("create it with ", 1)[1]
    assert shlex.split(command)[:4] == ["python", "launch/prepare_data.py", "--out", str(odd)]
    (odd / "latest").write_text("step_1")
    with pytest.raises(ValueError) as e:
        load_hf_config(odd)
    command = str(e.value).split("export it (", 1)[1].split(") and pass DIR")[0]
    assert shlex.split(command)[:3] == ["python", "launch/export.py", str(odd)]


def test_an_out_dir_with_a_double_colon_is_refused_by_name(tmp_path):
    """datasets splits its cache path (under out_dir) at '::': an IsADirectoryError from fsspec named neither."""
    (tmp_path / "c.txt").write_text("\n\n".join(f"document {i} with some words" for i in range(50)))
    with pytest.raises(ValueError, match=r"out_dir .*a::b/data' has '::' in its path, which Hugging Face datasets "
                                         r"reads as a chained URL .*: give a directory without '::'"):
        prepare_data([str(tmp_path / "c.txt")], tmp_path / "a::b" / "data", vocab_size=300)

