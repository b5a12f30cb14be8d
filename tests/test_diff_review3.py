"""A review of bb0692b..: what the plain-path links and the stale-WORLD_SIZE check (the session's own changes) broke.
Oracles: the same failure under a plain folder (its message, the folder renamed), and the environments torchrun and
the deepspeed launcher give their ranks, read from those launchers themselves."""
import json
import subprocess
import sys

import pytest
import torch

from launch_utils import ROOT, free_port, launch_env, run_deepspeed

from relora_ds.checkpoint import full_state_dict
from relora_ds.universal import make_universal


def _error(call, folder):
    step = folder / "step_1"
    step.mkdir(parents=True)
    # a checkpoint's ZeRO file that holds no ZeRO state: DeepSpeed's readers fail on it, naming the folder
    torch.save({"optimizer_state_dict": {"zero_stage": 2}}, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception) as e:
        call(folder, "step_1")
    return e.value


@pytest.mark.parametrize("call", [make_universal, full_state_dict], ids=["universal", "export"])
def test_an_error_under_a_folder_with_brackets_names_the_checkpoint(tmp_path, call):
    """checkpoint.globbable hands DeepSpeed a link with a plain path: its errors named that link (a temporary
    directory, removed when the error reached the user: "converting /tmp/relora_ds-ckpt-x/checkpoints/step_1 with
    deepspeed.checkpoint.ds_to_universal failed", "can't find *_model_states.pt files in directory '/tmp/...'"), not
    the checkpoint that failed. Oracle: the same failure under a plain folder, whose name the message holds."""
    plain, odd = (tmp_path / "runs v2").resolve(), (tmp_path / "runs [v2]").resolve()
    want, got = _error(call, plain), _error(call, odd)
    assert type(got) is type(want) and str(plain) in str(want)
    assert "relora_ds-ckpt-" not in str(got)
    for line in (0, -1):  # its first line and the converter's last (a long log between is cut at 3000 characters)
        assert str(got).splitlines()[line] == str(want).splitlines()[line].replace(str(plain), str(odd))


# (the deepspeed launcher puts --local_rank=0 first: the last two arguments are the repository and the output dir)
_CHECK = ("import json, os, sys\n"
          "root, out = sys.argv[-2:]\n"
          "sys.path.insert(0, root)\n"
          "from relora_ds.distributed import _check_launcher_env\n"
          "try:\n"
          "    _check_launcher_env()\n"
          "    said = 'accepted'\n"
          "except ValueError as e:\n"
          "    said = str(e)\n"
          "with open(os.path.join(out, 'rank' + os.environ['RANK'] + '.json'), 'w') as f:\n"
          "    json.dump({'said': said, 'world': os.environ['WORLD_SIZE']}, f)\n")


def _said(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_per_node_launcher_in_a_step_of_more_tasks_is_not_a_stale_shell(tmp_path, monkeypatch, launcher):
    """In a Slurm step of 4 tasks (`srun -n 4 --pty bash`, then a launcher on fewer GPUs; or each task of
    `srun -n 4 deepspeed --num_gpus 1 ...` a run of its own), the launcher's WORLD_SIZE=1 is its own, fresh: the
    check for a RANK/WORLD_SIZE left in the shell refused it ("some would share a rank ... unset RANK, WORLD_SIZE"),
    which unsetting does not change. Oracle: the environment each launcher gives its rank. A stale shell's (no
    launcher between srun and the rank) is still refused."""
    script = tmp_path / "check.py"
    script.write_text(_CHECK)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    if launcher == "deepspeed":
        run_deepspeed(script, ROOT, out, nprocs=1)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
               "--master-port", str(free_port()), str(script), str(ROOT), str(out)]
        proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _said(out) == [{"said": "accepted", "world": "1"}]
    stale = {**launch_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500", "SLURM_STEP_NUM_TASKS": "4"}
    subprocess.run([sys.executable, str(script), str(ROOT), str(out)], env=stale, check=True, timeout=120)
    assert "some would share a rank" in _said(out)[0]["said"]
