"""A review of b414e67 e9b48b1 441979d 4692fea 0c1de57: the op-cache fallback and the tolerant stdout.
Oracles: bash itself running scripts/setup_env.sh's op-cache lines, and the behaviour the scripts had before
(a run with stdout closed printed nothing and ran)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import ROOT


def _op_cache_lines(script: str) -> str:
    """scripts/setup_env.sh's lines that choose TORCH_EXTENSIONS_DIR, from their `if` to its `fi`."""
    lines = script.splitlines()
    start = lines.index('if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then')
    return "\n".join(lines[start:lines.index("fi", start) + 1])


def _choose_op_cache(script: str, env: dict) -> subprocess.CompletedProcess:
    # a venv no user can write, not even root (a path that does not exist): the fallback's branch
    body = "\n".join(["set -euo pipefail", "VENV=/nonexistent/shared/venv", _op_cache_lines(script),
                      'echo "$TORCH_EXTENSIONS_DIR"'])
    return subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True)


def test_the_op_cache_of_a_shared_venv_without_a_home_directory():
    """HOME unset (docker --user N, which train_config and the data cache now name): the fallback's $HOME under
    set -u stopped setup_env.sh, and with it scripts/test.sh and demo.sh, with 'HOME: unbound variable'."""
    env = {"PATH": os.environ["PATH"]}  # no HOME, XDG_CACHE_HOME or TORCH_EXTENSIONS_DIR
    done = _choose_op_cache((ROOT / "scripts" / "setup_env.sh").read_text(), env)
    assert done.returncode == 0, done.stderr
    folder = done.stdout.strip()
    assert os.path.isabs(folder) and not folder.startswith("/.cache"), folder  # not "$HOME/.cache" of an empty HOME
    home = _choose_op_cache((ROOT / "scripts" / "setup_env.sh").read_text(), {**env, "HOME": "/home/u"})
    assert home.returncode == 0 and home.stdout.startswith("/home/u/.cache/torch_extensions_"), home


def test_train_runs_with_stdout_closed():
    """`launch/train.py ... >&-` (a daemonised start): sys.stdout is None, print() writes nothing and the run
    went on; the unguarded sys.stdout.reconfigure in train.py died of AttributeError before parsing its
    arguments. The other scripts' tolerant_stdout checks for reconfigure; --help (argparse writes to stderr
    when stdout is None) is the oracle: it exits 0, as it did before."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(f"exec {sys.executable} launch/train.py --help >&-", shell=True, cwd=ROOT, env=env,
                          capture_output=False, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--seed" in done.stderr  # the help, on stderr


def test_the_op_folder_check_looks_where_torch_builds_when_the_variable_is_empty(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR set but empty (`export TORCH_EXTENSIONS_DIR=$UNSET_VAR`): torch takes it as given and
    builds the op in the working directory; check_op_build_dir took it for unset and judged torch's default
    root instead, refusing a start torch would make (the default unwritable, the working directory not)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils import cpp_extension

    from relora_ds.shm_comm import check_op_build_dir

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip("DeepSpeed's accelerator here has no shared-memory op")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "a_file" / "ext"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.chdir(tmp_path)
    where = Path(cpp_extension._get_build_directory(builder.name, False))  # the oracle: torch's own choice
    assert where.resolve().parent == tmp_path.resolve()
    check_op_build_dir(get_accelerator())  # the working directory is writable: no error


def test_a_module_named_like_the_checkpoint_wrappers_level_is_merged():
    """merged_state_dict dropped '_checkpoint_wrapped_module.' anywhere in a name: a model's own module named
    'x_checkpoint_wrapped_module' (no wrapper at all) had its merged weight written as 'xq_proj.weight' and the
    unmerged base, with lora_A/B, under the true name. Oracle: the same model with the module named 'x'."""
    import torch
    from torch import nn

    from relora_ds.hf import merged_state_dict
    from relora_ds.relora import wrap

    def model(child: str) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Module()
        m.add_module(child, nn.ModuleDict({"q_proj": nn.Linear(8, 8)}))
        wrap(m, rank=2, target_modules=["q_proj"])
        with torch.no_grad():
            getattr(m, child)["q_proj"].lora_B.normal_()  # a merge that changes the weight
        return m

    named_model, plain_model = model("x_checkpoint_wrapped_module"), model("x")
    # the same tensors (wrap seeds each layer's lora_A by its name)
    plain_model.load_state_dict({k.replace("x_checkpoint_wrapped_module.", "x.", 1): t
                                 for k, t in named_model.state_dict().items()})
    plain, named = merged_state_dict(plain_model), merged_state_dict(named_model)
    assert sorted(named) == sorted(k.replace("x.", "x_checkpoint_wrapped_module.", 1) for k in plain)
    torch.testing.assert_close(named["x_checkpoint_wrapped_module.q_proj.weight"], plain["x.q_proj.weight"],
                               rtol=0, atol=0)
