"""A shared cluster where not everything is this user's: DeepSpeed's op folder another user's (a read-only shared
venv), the relora_ds checkout another user's. No second user: root passes os.access, so a read-only folder is
also denied to os.access where the tests run as root."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_utils import ROOT
from test_preflight import _preflight
from trainer_utils import packed_data_dir, write

sys.path.insert(0, str(ROOT / "launch"))


def _read_only(monkeypatch, folder):
    """``folder`` (and what it holds) read-only for this user: by its mode, and for os.access where root, which
    modes do not stop, runs the tests."""
    folder = folder.resolve()
    for path in (folder, *folder.rglob("*")):
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() != 0:
        return
    access = os.access

    def as_another_user(path, mode, **kw):
        real = Path(os.path.realpath(path))
        return not (mode & os.W_OK and (real == folder or folder in real.parents)) and access(path, mode, **kw)
    monkeypatch.setattr(os, "access", as_another_user)


def test_preflight_names_an_op_folder_this_user_cannot_write(tmp_path, monkeypatch):
    """scripts/setup_env.sh points TORCH_EXTENSIONS_DIR into the venv: in a shared venv another user installed,
    with the op built there already, every rank died in deepspeed.init_distributed with torch's PermissionError
    on the op's lock file (reproduced as a second user). Preflight names the folder and the ways out."""
    from torch.utils.file_baton import FileBaton

    recipe, ds = write(tmp_path, packed_data_dir(tmp_path / "data", 20000, 2000))
    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    args = ("--world-size", "2", "--config", recipe, "--deepspeed", ds)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = _preflight(*args, env=env)
    assert proc.returncode == 0, proc.stderr  # a folder of this user's: no refusal
    _read_only(monkeypatch, ext)
    if os.geteuid() != 0:  # the oracle: torch's own lock, which the ranks take, fails there
        with pytest.raises(PermissionError):
            FileBaton(str(ext / "deepspeed_shm_comm" / "lock")).try_acquire()
    proc = _preflight(*args, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: DeepSpeed's deepspeed_shm_comm op") and f"TORCH_EXTENSIONS_DIR={ext}" in error
    assert f"{ext / 'deepspeed_shm_comm'} is not writable by this user" in error
    assert "Set TORCH_EXTENSIONS_DIR to a directory of your own" in error and "DS_BUILD_SHM_COMM=1" in error
    # Unset, torch's default under the home directory: a read-only home is named as such.
    home = tmp_path / "home"
    home.mkdir()
    _read_only(monkeypatch, home)
    env = {k: v for k, v in env.items() if k != "TORCH_EXTENSIONS_DIR"}
    proc = _preflight(*args, env={**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")})
    assert proc.returncode == 2, proc.stderr
    assert f"lives in {home / '.cache' / 'torch_extensions'} (torch's default, TORCH_EXTENSIONS_DIR being unset), " \
           f"and {home} is not writable" in proc.stderr


def test_every_rank_names_an_op_folder_it_cannot_write_before_deepspeed_starts(tmp_path, monkeypatch):
    """The ranks themselves (started without preflight, as the deepspeed launcher and torchrun start them): the
    same one-line error from init_distributed, before deepspeed.init_distributed takes torch's lock there."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from relora_ds.distributed import init_distributed

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        pytest.skip("the CPU accelerator's op (DS_ACCELERATOR=cpu, as the tests run)")
    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    _read_only(monkeypatch, ext)
    for var, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
                           TORCH_EXTENSIONS_DIR=str(ext)).items():
        monkeypatch.setenv(var, value)
    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(kw))
    with pytest.raises(ValueError, match=r"DeepSpeed's deepspeed_shm_comm op, which every rank loads at start-up, "
                                         r"lives in .*ext/deepspeed_shm_comm \(TORCH_EXTENSIONS_DIR="):
        init_distributed()
    assert not started


def test_run_info_records_the_commit_of_a_checkout_another_user_owns(tmp_path, monkeypatch):
    """git (>= 2.35.2) refuses a repository another user owns ("dubious ownership"): every run from a checkout
    installed once on a shared file system recorded git: null (reproduced as a second user). The oracle: git
    itself, asked as the owner. GIT_TEST_ASSUME_DIFFERENT_OWNER is git's own switch for its ownership test."""
    from relora_ds import run_info

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*a, **env):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                              capture_output=True, text=True, env={**os.environ, **env})

    git("init", "-q")
    (repo / "f.txt").write_text("one\n")
    git("add", "f.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD").stdout.strip()
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    assert "dubious ownership" in git("rev-parse", "HEAD").stderr  # what a second user's git says
    assert run_info._git(repo) == {"commit": head, "dirty": False}
    (repo / "f.txt").write_text("two\n")
    assert run_info._git(repo) == {"commit": head, "dirty": True}


@pytest.mark.parametrize("script", ["export.py", "update_rank.py"])
def test_help_under_an_ascii_stdout_escapes_what_it_cannot_encode(script):
    """PYTHONIOENCODING=ascii (or LC_ALL=C with PYTHONUTF8=0, a Latin-1 locale): '·' and 'Δ' in the help raised
    UnicodeEncodeError. Oracle: the same help under UTF-8, escaped as Python's backslashreplace escapes it."""
    from launch_utils import launch_env, run_python

    utf8 = run_python(ROOT / "launch" / script, "--help", env={**launch_env(), "PYTHONIOENCODING": "utf-8"})
    ascii_ = run_python(ROOT / "launch" / script, "--help", env={**launch_env(), "PYTHONIOENCODING": "ascii"})
    assert utf8.returncode == 0 and ascii_.returncode == 0, ascii_.stderr[-2000:]
    assert any(ord(c) > 127 for c in utf8.stdout)
    assert ascii_.stdout == utf8.stdout.encode("ascii", "backslashreplace").decode("ascii")


def test_a_run_into_a_non_ascii_folder_under_an_ascii_stdout_finishes(tmp_path, small_data_dir):
    """Its progress and "exported ... to" lines name the folder: with PYTHONIOENCODING=ascii the run died at
    the first line that did (tqdm.write -> UnicodeEncodeError)."""
    from launch_utils import free_port, launch_env, run_python

    recipe, ds = write(tmp_path, small_data_dir, total_steps=3, eval_every=3, export=True,
                       output_dir=str(tmp_path / "réal run"))
    env = {**launch_env(), "PYTHONIOENCODING": "ascii", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_python(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "r\\xe9al run" in proc.stdout and (tmp_path / "réal run" / "hf" / "model.safetensors").is_file()


def _no_home(monkeypatch):
    """As under `docker --user N`: HOME unset and no passwd entry for the uid (expanduser cannot expand ~)."""
    import pwd

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("RELORA_DATA_CACHE", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert os.path.expanduser("~/x") == "~/x"


def test_without_a_home_directory_a_tilde_path_and_the_builtin_cache_are_named(monkeypatch):
    """output_dir ~/r trained into a folder named '~' in the working directory (which a later `rm -rf ~` ...);
    the built-in corpus's default cache raised pathlib's bare "Could not determine home directory"."""
    from relora_ds.data import builtin_data_dir
    from relora_ds.train_config import TrainConfig

    _no_home(monkeypatch)
    with pytest.raises(ValueError, match=r"output_dir='~/r' starts with ~, but this process has no home directory "
                                         r"to expand it to \(HOME is unset\): give the path in full"):
        TrainConfig(output_dir="~/r")
    with pytest.raises(ValueError, match=r"the built-in corpus's cache ~/.cache/relora_ds is under the home "
                                         r"directory, and this process has none .*: set RELORA_DATA_CACHE"):
        builtin_data_dir(512)
    monkeypatch.setenv("RELORA_DATA_CACHE", "/data/cache")
    assert builtin_data_dir(512) == Path("/data/cache/builtin-vocab512")


def test_an_export_gives_the_tokenizer_the_modes_its_own_files_get(tmp_path, small_data_dir):
    """shutil.copy copied the source's mode: data prepared under umask 077 gave the export a 0600 tokenizer
    beside 0644 weights (under umask 022), which the group could load without its tokenizer. Oracle: the mode
    the export's own model.safetensors gets."""
    import relora_ds
    from relora_ds.data import load_manifest

    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(Path(load_manifest(small_data_dir)["tokenizer_path"]).read_bytes())
    tokenizer.chmod(0o600)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=512))
    old = os.umask(0o022)
    try:
        out = relora_ds.export_hf(model, tmp_path / "hf", tokenizer=tokenizer, hf_tokenizer=False)
    finally:
        os.umask(old)
    weights = (out / "model.safetensors").stat().st_mode & 0o777
    assert weights == 0o644 and (out / "tokenizer.model").stat().st_mode & 0o777 == weights


def test_an_output_this_user_cannot_write_is_named_before_any_work(tmp_path):
    """export --out, evaluate --out, update_rank --json into a folder this user cannot write: a PermissionError
    traceback after the checkpoint was read or the evaluation done (its result lost). /proc/1 stands for it: no
    user, root included, may create files there (os.access and the kernel agree)."""
    from launch_utils import launch_env, run_python

    assert not os.access("/proc/1", os.W_OK)
    hf = tmp_path / "hf"
    hf.mkdir()
    for script, args in (("export.py", [tmp_path, "--out", "/proc/1/exp"]),
                         ("evaluate.py", [hf, "--data-dir", tmp_path, "--seq-len", "8", "--out", "/proc/1/e.json"]),
                         ("update_rank.py", [hf, hf, "--json", "/proc/1/r.json"])):
        proc = run_python(ROOT / "launch" / script, *args, env=launch_env())
        flag = "--json" if script == "update_rank.py" else "--out"
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (script, proc.stderr[-2000:])
        assert f"{flag} /proc/1/" in proc.stderr and "/proc/1 is not writable by this user" in proc.stderr, script

