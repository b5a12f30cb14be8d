"""Launcher helpers without a cluster: errors before launching (missing SLURM variables, unknown hosts), the
per-task environment, hostfiles (launch/preflight.py: tests/test_preflight.py)."""
import os
import signal
import subprocess
import sys

import pytest

from launch_utils import ROOT
from launch_utils import clean_env as _clean_env
from launch_utils import run_tool as _run

sys.path.insert(0, str(ROOT / "launch"))
import hostfile  # noqa: E402


@pytest.mark.parametrize("script", ["train.sbatch", "train_deepspeed.sbatch"])
def test_sbatch_script_outside_slurm_names_the_missing_variables(script):
    proc = _run("bash", ROOT / "launch/slurm" / script)
    assert proc.returncode == 2
    assert ("SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NTASKS not set: submit this script "
            "with sbatch") in proc.stderr
    proc = _run("bash", ROOT / "launch/slurm" / script, env=_clean_env(SLURM_JOB_ID="7", SLURM_NTASKS="2"))
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES not set" in proc.stderr


def test_rank_env_maps_slurm_task_ids():
    env = _clean_env(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4", MASTER_ADDR="n1", MASTER_PORT="29501")
    proc = _run(ROOT / "launch/slurm/rank_env.sh", "env", env=env)
    assert proc.returncode == 0, proc.stderr
    assert {"RANK=3", "LOCAL_RANK=1", "WORLD_SIZE=4"} <= set(proc.stdout.splitlines())
    proc = _run(ROOT / "launch/slurm/rank_env.sh", "env", env=_clean_env(SLURM_PROCID="0"))
    assert proc.returncode == 2
    assert "SLURM_LOCALID SLURM_NTASKS MASTER_ADDR MASTER_PORT not set" in proc.stderr


def test_ds_node_needs_the_rendezvous_and_its_own_line(tmp_path):
    (tmp_path / "hf").write_text("n1 slots=2\nn2 slots=2\n")
    proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "launch/train.py")
    assert proc.returncode == 2 and "MASTER_ADDR not set" in proc.stderr
    env = _clean_env(MASTER_ADDR="n1", MASTER_PORT="29501", SLURMD_NODENAME="n9", PYTHON=sys.executable)
    proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "launch/train.py", env=env)
    assert proc.returncode == 2 and "this node (n9" in proc.stderr and "is not in the hostfile (n1, n2)" in proc.stderr
    # SLURM gave this job GPUs 4 and 5 of a shared node: the launcher would put the ranks on GPUs 0 and 1.
    env.update(SLURMD_NODENAME="n2", CUDA_VISIBLE_DEVICES="4,5")
    proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "launch/train.py", env=env)
    assert proc.returncode == 2 and "CUDA_VISIBLE_DEVICES=4,5 on this node" in proc.stderr, proc.stderr
    assert "GPUs 0,1 whatever it says" in proc.stderr and "--exclusive" in proc.stderr
    hostfile.check_visible_devices(2, "0,1")  # what the launcher uses anyway, or no restriction: accepted
    hostfile.check_visible_devices(2, None)
    hostfile.check_visible_devices(2, "0,1,2,3")  # a whole 4-GPU node, 2 slots used: GPUs 0,1 are the job's
    hostfile.check_visible_devices(2, "1,0")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=0 on this node"):
        hostfile.check_visible_devices(2, "0")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1,2,3 on this node"):
        hostfile.check_visible_devices(2, "1,2,3")


def test_ds_node_divides_the_node_cpus_by_its_own_slots(tmp_path):
    """train_deepspeed.sbatch divided --cpus-per-task by the mean slots per node: with a hostfile of 8 and 2
    slots, the 8-rank node ran 8 x 12 threads on 64 CPUs (a review's find). A stand-in for python prints the
    threads the launcher would get."""
    (tmp_path / "hf").write_text("n1 slots=8\nn2 slots=2\n")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "OMP=$OMP_NUM_THREADS"; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    for node, cpus, user, want in (("n1", "64", None, "OMP=8"), ("n2", "64", None, "OMP=32"),
                                   ("n1", "4", None, "OMP=1"), ("n1", None, "5", "OMP=5")):
        env = _clean_env(MASTER_ADDR="n1", MASTER_PORT="29501", SLURMD_NODENAME=node, PYTHON=str(fake),
                         **({"DS_NODE_CPUS": cpus} if cpus else {}), **({"OMP_NUM_THREADS": user} if user else {}))
        proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "launch/train.py", env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == want, (node, cpus, user, proc.stdout, proc.stderr)


def test_hostfile_parse_errors():
    assert hostfile.parse_hostfile("# nodes\nn1 slots=8\n\nn2 slots=4  # half\n") == {"n1": 8, "n2": 4}
    for text, msg in [("n1 slots=8\nn1 slots=8\n", "hostfile:2: host 'n1' is listed twice"),
                      ("n1 slots=0\n", "slots=0; need at least 1"),
                      ("n1 8\n", "hostfile:1: 'n1 8' is not 'HOST slots=N'"),
                      ("n1 slots=8 extra\n", "is not 'HOST slots=N'"),
                      ("# only a comment\n", "no 'HOST slots=N' lines"),
                      # a review found these passing `check` while DeepSpeed's launcher kept them in the name
                      ("\ufeffn1 slots=8\n", "hostfile starts with a UTF-8 byte-order mark"),
                      ("n1 slots=8\nn\u00e92 slots=8\n", r"hostfile:2: host 'n\u00e92' holds characters a host name "
                                                        r"cannot \(U\+00E9\): retype"),
                      ("n1\u200b slots=8\n", r"\(U\+200B\)")]:
        with pytest.raises(ValueError, match=msg):
            hostfile.parse_hostfile(text)


def test_hostfile_check_names_unknown_hosts(tmp_path, monkeypatch):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\nnode-that-does-not-exist.invalid slots=2\n")
    proc = _run(sys.executable, "launch/hostfile.py", "check", hf)
    assert proc.returncode == 2
    assert "unknown host(s) node-that-does-not-exist.invalid: names that do not resolve" in proc.stderr
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(ValueError, match=r"unknown host\(s\) n3: not nodes of SLURM job 42 \(its nodes: n1, n2\)"):
        hostfile.check({"n1": 8, "n3": 8}, ["n1", "n2"])
    proc = _run(sys.executable, "launch/hostfile.py", "check", tmp_path / "missing")
    assert proc.returncode == 2 and "no such file (the deepspeed launcher would silently train" in proc.stderr
    hf.write_text("localhost slots=2\n")
    proc = _run(sys.executable, "launch/hostfile.py", "check", hf)
    assert (proc.returncode, proc.stdout) == (0, "2\n")  # the world size
    # train_deepspeed.sbatch starts the launcher on every node: a node left out is an error there, and
    # MASTER_ADDR is the hostfile's first host (rank 0), not the allocation's first node.
    hostfile.check({"n2": 8, "n1": 8}, ["n1", "n2"], all_nodes=True)
    with pytest.raises(ValueError, match=r"node\(s\) n3 of SLURM job 42 are not listed"):
        hostfile.check({"n2": 8, "n1": 8}, ["n1", "n2", "n3"], all_nodes=True)
    hf.write_text("n2 slots=8\nn1 slots=8\n")
    proc = _run(sys.executable, "launch/hostfile.py", "first-host", hf)
    assert (proc.returncode, proc.stdout) == (0, "n2\n")


def test_hostfile_node_rank_and_from_slurm_outside_a_job(tmp_path):
    assert hostfile.node_rank({"n1": 8, "n2": 8, "n3": 8}, "n2") == 1
    proc = _run(sys.executable, "launch/hostfile.py", "from-slurm", "--slots", "8")
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is not set" in proc.stderr


def test_hostfile_subcommands_take_no_abbreviated_flags(tmp_path, capsys):
    """--ho was read as node-rank's --host (argparse's sub-parsers abbreviate unless told not to)."""
    hf = tmp_path / "hostfile"
    hf.write_text("n1 slots=2\nn2 slots=2\n")
    assert hostfile.main(["node-rank", str(hf), "--host", "n2"]) == 0 and capsys.readouterr().out.strip() == "1"
    with pytest.raises(SystemExit):
        hostfile.main(["node-rank", str(hf), "--ho", "n2"])
    assert "unrecognized arguments: --ho" in capsys.readouterr().err


def test_hostfile_node_rank_falls_back_to_the_short_hostname(monkeypatch):
    """Outside a SLURM step (no SLURMD_NODENAME) a node whose hostname is fully qualified, n2.cluster, is found
    in a hostfile of short names by its short name: n2 is the second line, node rank 1 (by hand); the full name
    itself is taken too, and a node in neither form is named in the error (a mutation trial found the
    short-name fallback untested)."""
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    monkeypatch.setattr(hostfile.socket, "gethostname", lambda: "n2.cluster")
    assert hostfile.node_rank({"n1": 8, "n2": 8}) == 1
    assert hostfile.node_rank({"n1.cluster": 8, "n2.cluster": 8}) == 1
    with pytest.raises(ValueError, match=r"this node \(n2.cluster / n2\) is not in the hostfile \(n1, n3\)"):
        hostfile.node_rank({"n1": 8, "n3": 8})
    monkeypatch.setenv("SLURMD_NODENAME", "n1")  # SLURM's node name comes first
    assert hostfile.node_rank({"n1": 8, "n2": 8}) == 0


def test_hostfile_names_scontrols_own_error_when_it_cannot_expand_the_nodelist(tmp_path):
    """A user trial's find: only "Command '[...scontrol...]' returned non-zero exit status 1" was reported;
    scontrol's stderr, which says why, was captured and dropped."""
    import stat
    (tmp_path / "scontrol").write_text("#!/usr/bin/env bash\necho 'scontrol: error: Invalid node name specified' >&2\n"
                                       "exit 1\n")
    (tmp_path / "scontrol").chmod(stat.S_IRWXU)
    env = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n[1-")
    proc = _run(sys.executable, "launch/hostfile.py", "from-slurm", "--slots", "8", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: cannot expand SLURM_JOB_NODELIST='n[1-': scontrol show hostnames exited 1: "
                           "scontrol: error: Invalid node name specified\n")
    (tmp_path / "hf").write_text("n1 slots=8\n")
    proc = _run(sys.executable, "launch/hostfile.py", "check", tmp_path / "hf", env=env)
    assert proc.returncode == 2 and "exited 1: scontrol: error: Invalid node name specified" in proc.stderr


def test_slurm_start_up_line_names_the_master_the_ranks_get(tmp_path):
    """common.sh's prepare_training: MASTER_ADDR is the allocation's first node, or the host it is given
    (train_deepspeed.sbatch passes a HOSTFILE's first host), and the start-up line names that one."""
    import stat
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", 'printf "n1\\nn2\\n"'), ("fakepython", f'echo {tmp_path}/out')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    script = ("source launch/slurm/common.sh; SLURM_JOB_ID=5; SLURM_JOB_NODELIST='n[1-2]'; SLURM_JOB_NUM_NODES=2; "
              "prepare_training 4 $MASTER; echo ranks-get=$MASTER_ADDR")
    # _clean_env: an in-process trainer earlier in this worker may have set MASTER_PORT (as a plain
    # `python launch/train.py` does for itself), which common.sh would rightly keep.
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"))
    for master, want in (("", "n1"), ("n2", "n2")):
        out = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**env, "MASTER": master}, capture_output=True,
                             text=True, check=True).stdout
        assert f"master {want}:20005" in out and f"ranks-get={want}" in out, out


# Spellings of deepspeed launcher options, each to be classified by DeepSpeed's own parser
_LAUNCHER_WORDS = [["--exclude", "n1"], ["--include=n2:0"], ["-i", "n1"], ["-in1"], ["-i=n1"], ["--incl", "n1@n2"],
                   ["-e", "n2:1"], ["--exc=n2"], ["--num_gpus", "1"], ["--num_accelerators=1"], ["--num_n", "1"],
                   ["-H", "hf"], ["-Hhf"], ["--hostf=hf"], ["--node_rank", "1"], ["--master_addr", "n2"],
                   ["--master_a", "n2"], ["--master_port=1"],
                   ["--bind_cores_to_rank"], ["--enable_each_rank_log", "logs"], ["--no_ssh_check"], ["--no_ssh"],
                   ["--no_python"], ["--no_local_rank"], ["--launcher", "pdsh"], ["--bind_core_list", "0-3"],
                   ["--ssh_port", "22"], ["--save_pid"], ["--force_multi"], ["--module"], ["--log_level=info"],
                   # switches leading a cluster of short options (argparse reads -qe n1 as -q -e n1), values
                   ["-qe", "n1"], ["-qen1"], ["-qi=n1"], ["-qH", "hf"], ["-q"], ["-q", "--launcher_args", "xe"]]


@pytest.mark.parametrize("words", _LAUNCHER_WORDS, ids=" ".join)
def test_launcher_args_refused_are_those_deepspeed_reads_as_the_scripts_or_a_host_choice(words):
    """hostfile.check_launcher_args (train_deepspeed.sbatch's DS_LAUNCHER_ARGS check) against the oracle, DeepSpeed's
    own runner parser: a spelling it reads as --include/--exclude/--num_nodes/--num_gpus (a choice of hosts or GPUs,
    which shifts --no_ssh node ranks) or as --hostfile/--node_rank/--master_addr/--master_port (which ds_node.sh
    passes) is refused, naming the option; anything else passes."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    watched = ("include", "exclude", "num_nodes", "num_gpus", "hostfile", "node_rank", "master_addr", "master_port")
    default = vars(runner.parse_args(["train.py"]))
    parsed = vars(runner.parse_args([*words, "train.py"]))
    changed = [k for k in watched if parsed[k] != default[k]]
    assert parsed["user_script"] == "train.py" and parsed["user_args"] == []
    # ds_node.sh's split of a whole command line: the launcher's words are those before the script, whose own
    # arguments (here words the launcher would read as its options) are not the launcher's
    script_args = ["--exclude", "n1", "-i", "x"]
    assert vars(runner.parse_args([*words, "train.py", *script_args]))["user_args"] == script_args
    assert hostfile.launcher_words([*words, "train.py", *script_args]) == words
    if changed:
        option = {"num_gpus": "--num_(gpus|accelerators)"}.get(changed[0], f"--{changed[0]}")  # its alias
        with pytest.raises(ValueError, match=rf"DS_LAUNCHER_ARGS=.*{option}.* is not an option to give here: "):
            hostfile.check_launcher_args(words)
    else:
        hostfile.check_launcher_args(words)


def test_ds_node_refuses_launcher_options_that_choose_hosts_before_its_script(tmp_path):
    """ds_node.sh run by another scheduler's job line (no train_deepspeed.sbatch to check DS_LAUNCHER_ARGS): with
    --exclude n1 before the script, n1 started n2's ranks. Refused before the launcher starts; the same words
    after the script are the script's, and an option's value (--enable_each_rank_log's) is not the script."""
    (tmp_path / "hf").write_text("n1 slots=2\nn2 slots=2\n")
    fake = tmp_path / "python"  # a stand-in for python that prints the launcher's command line
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "$@"; exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = _clean_env(MASTER_ADDR="n1", MASTER_PORT="29501", SLURMD_NODENAME="n2", PYTHON=str(fake))
    proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "--exclude", "n1", "launch/train.py", env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "error: ds_node.sh's launcher options='--exclude n1': --exclude is not an option to give here: the " \
        "script starts a launcher on every node" in proc.stderr, proc.stderr
    proc = _run(ROOT / "launch/slurm/ds_node.sh", tmp_path / "hf", "--enable_each_rank_log", "logs", "launch/train.py",
                "--exclude", "n1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-m", "deepspeed.launcher.runner", "--hostfile", str(tmp_path / "hf"), "--no_ssh",
                                   "--node_rank=1", "--master_addr=n1", "--master_port=29501",
                                   "--enable_each_rank_log", "logs", "launch/train.py", "--exclude", "n1"], proc.stdout


def test_launcher_args_subcommand_takes_the_words_after_a_double_dash():
    proc = _run(sys.executable, "launch/hostfile.py", "launcher-args", "--", "--bind_cores_to_rank", "--exclude", "n1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: DS_LAUNCHER_ARGS='--bind_cores_to_rank --exclude n1': --exclude is not an "
                                  "option to give here: the script starts a launcher on every node"), proc.stderr
    assert "choose the nodes with sbatch (--nodes, --nodelist, --exclude)" in proc.stderr
    for words in ([], ["--enable_each_rank_log", "logs"]):
        proc = _run(sys.executable, "launch/hostfile.py", "launcher-args", "--", *words)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_ds_node_ignores_stop_signals_from_its_first_line(tmp_path):
    """A USR1 (or TERM) to the step while ds_node.sh checked its hostfile line killed the task (bash's default
    action), and with srun --kill-on-bad-exit the whole step, unsaved; the script ignored them only from the
    launcher's start. A stand-in python signals its parent, ds_node.sh, during the check; the oracle is the same
    stand-in under a bash without the trap, which dies of it."""
    (tmp_path / "hf").write_text("n1 slots=2\n")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo launched; exit 0; fi\nkill -$STOP_SIGNAL $PPID\n'
                    f'sleep 0.2\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    plain = tmp_path / "plain.sh"  # ds_node.sh's hostfile check alone, without its trap
    plain.write_text('#!/usr/bin/env bash\nline=$("$PYTHON" launch/hostfile.py node-rank "$1")\necho "checked $line"\n')
    plain.chmod(0o755)
    default = dict(preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGUSR1, signal.SIGTERM)])
    for sig in ("USR1", "TERM"):
        env = _clean_env(MASTER_ADDR="n1", MASTER_PORT="29501", SLURMD_NODENAME="n1", PYTHON=str(fake),
                         STOP_SIGNAL=sig)
        proc = subprocess.run([str(plain), str(tmp_path / "hf")], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, **default)
        assert proc.returncode == -getattr(signal, f"SIG{sig}") and proc.stdout == "", (sig, proc)
        proc = subprocess.run([str(ROOT / "launch/slurm/ds_node.sh"), str(tmp_path / "hf"), "launch/train.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, **default)
        assert (proc.returncode, proc.stdout) == (0, "launched\n"), (sig, proc)
