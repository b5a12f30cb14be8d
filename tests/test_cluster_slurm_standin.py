"""launch/slurm/*.sbatch run by bash under stand-in srun/scontrol/scancel (no cluster, seconds each): what reaches
preflight and srun, exit statuses and messages, and the requeue decision around signals. A user trial's finds. The
same scripts on a real one-node SLURM: tests/test_cluster_slurm.py."""
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch_utils import ROOT, launch_env

_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
        "SLURM_CPUS_PER_TASK": "2", "SLURM_SUBMIT_DIR": str(ROOT)}

# The rank a stand-in srun starts with FAKE_RANK=1: on USR1/TERM it does what the trainer does (the "preempted"
# record last in metrics.jsonl, exit 0). Python, not bash: srun runs with TERM ignored, which bash cannot trap.
_RANK = """import os, signal, sys, time
def stop(signum, frame):
    time.sleep(float(os.environ.get("FAKE_SAVE_S", "0")))  # finishing the step, saving
    open(os.path.join(sys.argv[1], "metrics.jsonl"), "a").write('{"event": "preempted", "step": 7}\\n')
    os._exit(0)
signal.signal(signal.SIGUSR1, stop), signal.signal(signal.SIGTERM, stop)
# what the trainer appends once every rank has its handlers (common.sh stops re-sending a stop it then sees)
open(os.path.join(sys.argv[1], "run_info.jsonl"), "a").write('{"world_size": 1}\\n')
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])  # whole when it appears (the test waits for it, scancel reads it)
time.sleep(60)
sys.exit(1)
"""

_FAKES = {
    # records its argv (NUL-separated); with FAKE_RANK=1 becomes one rank, else exits 0 (the ranks trained). With
    # FAKE_SRUN_WAIT=1 the rank starts only once the file srun.release exists: until then the step's task is
    # starting (SLURM creating the step, a launcher importing), and a signal sent to it is lost.
    "srun": """printf '%s\\0' "$@" > "$FAKE_SLURM/srun.argv"
[[ -n "${FAKE_RANK:-}" ]] || exit 0
if [[ -n "${FAKE_SRUN_WAIT:-}" ]]; then
    touch "$FAKE_SLURM/srun.started"
    until [[ -e "$FAKE_SLURM/srun.release" ]]; do sleep 0.05; done
fi
exec "$REAL_PYTHON" "$FAKE_SLURM/rank.py" "$OUTPUT_DIR" "$FAKE_SLURM/rank.pid"
""",
    "scontrol": """echo "scontrol $*" >> "$FAKE_SLURM/calls"
if [[ "$1" == show ]]; then
    [[ -z "${FAKE_SCONTROL_ERROR:-}" ]] || { echo "scontrol: error: $FAKE_SCONTROL_ERROR" >&2; exit 1; }
    printf 'n1\\nn2\\n'
fi
""",
    # the signal to the job's steps: here, to the one rank; lost (as SLURM's scancel, which exits 0 with no step)
    # while the rank is not yet listening
    "scancel": """echo "scancel $*" >> "$FAKE_SLURM/calls"
[[ ! -e "$FAKE_SLURM/rank.pid" ]] || kill -s "${1#--signal=}" "$(cat "$FAKE_SLURM/rank.pid")"
""",
    # PYTHON: preflight records its argv and prints OUTPUT_DIR (with FAKE_PREFLIGHT_WAIT=1 it first waits for
    # the file preflight.release, so a test can signal the script meanwhile); hostfile.py etc. run for real
    "python": """if [[ "$1" == launch/preflight.py ]]; then
    printf '%s\\0' "$@" > "$FAKE_SLURM/preflight.argv"
    if [[ -n "${FAKE_PREFLIGHT_WAIT:-}" ]]; then
        touch "$FAKE_SLURM/preflight.started"
        until [[ -e "$FAKE_SLURM/preflight.release" ]]; do sleep 0.05; done
    fi
    echo "$OUTPUT_DIR"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
""",
}


class FakeJob:
    """An sbatch script run by bash as SLURM would run it (job 4242 on nodes n1, n2), with the stand-ins first on
    PATH; what they were given is kept for the test to read."""

    def __init__(self, tmp_path: Path, script: str, **variables):
        root = Path(tempfile.mkdtemp(dir=tmp_path))  # one per job: a test may run several
        self.dir = root / "fake_slurm"
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(parents=True)
        for name, body in _FAKES.items():
            (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
            (bin_dir / name).chmod(0o755)
        (self.dir / "rank.py").write_text(_RANK)
        self.run_dir = root / "run"
        self.run_dir.mkdir()
        env = {k: v for k, v in launch_env().items()
               if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                          "MASTER_PORT", "REQUEUE_SIGNALS")}
        env.update(_JOB, PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM=str(self.dir), REAL_PYTHON=sys.executable,
                   PYTHON=str(bin_dir / "python"), RECIPE="launch/configs/tiny.yaml", OUTPUT_DIR=str(self.run_dir),
                   TORCH_EXTENSIONS_DIR=str(root / "ext"))
        env.update(variables)
        self.proc = subprocess.Popen(["bash", str(ROOT / "launch/slurm" / script)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.dir / name).exists():
            assert self.proc.poll() is None, f"the script exited {self.proc.returncode} before {name}: " \
                                             f"{self.proc.communicate()}"
            assert time.monotonic() < deadline, f"no {name} after {timeout} s"
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def argv(self, which: str) -> list[str] | None:
        """What the stand-in srun or preflight ("srun", "preflight") was given; None if it never ran."""
        f = self.dir / f"{which}.argv"
        return f.read_text().split("\0")[:-1] if f.exists() else None

    def calls(self) -> list[str]:
        f = self.dir / "calls"
        return f.read_text().splitlines() if f.exists() else []


def _fake_job(tmp_path, script="train.sbatch", **variables) -> tuple[FakeJob, int, str, str]:
    return (job := FakeJob(tmp_path, script, **variables)), *job.finish()


def _after(argv: list[str], marker: str) -> list[str]:
    return argv[argv.index(marker) + 1:]


def test_train_args_and_launcher_args_over_several_lines_reach_preflight_and_srun_whole(tmp_path):
    """A TRAIN_ARGS value over two lines lost everything after the first newline (`read -a` reads one line):
    --lr and --data-dir were dropped and the job trained on the built-in corpus. Any whitespace separates
    words; quotes stay literal characters, as before (README: split on whitespace, no quoting)."""
    train_args = "--micro-batch-size 4 --global-batch-size 192\n  --lr 0.0001\t--data-dir /shared/c4\n"
    job, rc, out, err = _fake_job(tmp_path, TRAIN_ARGS=train_args)
    assert rc == 0, (out, err)
    want = ["--config", "launch/configs/tiny.yaml", "--deepspeed", "ds_configs/zero2.json", "--resume",
            "--output-dir", str(job.run_dir), "--micro-batch-size", "4", "--global-batch-size", "192",
            "--lr", "0.0001", "--data-dir", "/shared/c4"]
    assert job.argv("preflight") == ["launch/preflight.py", "--world-size", "4", *want]
    assert _after(job.argv("srun"), "launch/train.py") == want
    assert job.argv("srun")[:5] == ["--export=ALL", "--label", "--kill-on-bad-exit=1", "--cpus-per-task=2",
                                    "launch/slurm/rank_env.sh"]
    job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", GPUS_PER_NODE="2",
                                  TRAIN_ARGS="--lr 0.0001\n--total-steps 9 '--seed 3'",
                                  DS_LAUNCHER_ARGS="--bind_cores_to_rank\n  --enable_each_rank_log logs\n")
    assert rc == 0, (out, err)
    hostfile = job.run_dir / "hostfile-4242"
    assert hostfile.read_text() == "n1 slots=2\nn2 slots=2\n"
    assert _after(job.argv("srun"), "launch/slurm/ds_node.sh") == [
        str(hostfile), "--bind_cores_to_rank", "--enable_each_rank_log", "logs", "launch/train.py",
        *want[:5], "--output-dir", str(job.run_dir), "--lr", "0.0001", "--total-steps", "9", "'--seed", "3'"]
    assert job.argv("preflight")[:3] == ["launch/preflight.py", "--world-size", "4"]


def test_a_data_dir_on_the_second_line_of_train_args_is_checked_by_preflight(tmp_path):
    """The trial's own command, with the real preflight: the --data-dir on TRAIN_ARGS's second line reaches it
    and stops the job (exit 2) before srun; it used to be dropped and the job trained on the built-in corpus."""
    job, rc, out, err = _fake_job(tmp_path, PYTHON=sys.executable, TRAIN_ARGS=(
        "--micro-batch-size 4 --global-batch-size 192\n  --lr 0.0001 --data-dir /nonexistent/c4"))
    assert rc == 2 and "'/nonexistent/c4' is not a prepared data dir" in err, (out, err[-2000:])
    assert job.argv("srun") is None


def _signal_mid_run(tmp_path, sig, script="train.sbatch", **variables):
    job = FakeJob(tmp_path, script, FAKE_RANK="1", **variables)
    job.wait_for("rank.pid")  # the rank runs: srun_with_requeue's traps are set
    job.proc.send_signal(sig)
    return (job, *job.finish())


@pytest.mark.parametrize("spelling", ["SIGUSR1 SIGTERM", "USR1,TERM", " usr1 ,\tSigTerm ", "TERM"])
def test_requeue_signals_in_any_common_spelling_requeue_after_a_term_checkpoint(tmp_path, spelling):
    """REQUEUE_SIGNALS="SIGUSR1 SIGTERM" or "USR1,TERM" matched no signal: after the TERM checkpoint the job
    said 'not requeueing' and ended COMPLETED, never to resume."""
    job, rc, out, err = _signal_mid_run(tmp_path, signal.SIGTERM, REQUEUE_SIGNALS=spelling)
    assert rc == 0, (out, err)
    assert job.calls()[-2:] == ["scancel --signal=TERM 4242", "scontrol requeue 4242"], (job.calls(), out)
    assert "train.sbatch: checkpoint saved after SIGTERM; requeueing job 4242" in out


def test_default_requeue_signals_do_not_requeue_after_term_and_name_the_list(tmp_path):
    job, rc, out, err = _signal_mid_run(tmp_path, signal.SIGTERM, "train_deepspeed.sbatch", GPUS_PER_NODE="2")
    assert rc == 0, (out, err)
    assert "scancel --signal=USR1 4242" in job.calls() and "scontrol requeue 4242" not in job.calls()
    assert "checkpoint saved after SIGTERM; not requeueing (REQUEUE_SIGNALS=USR1)" in out
    job, rc, out, err = _signal_mid_run(tmp_path, signal.SIGUSR1, REQUEUE_SIGNALS="sigusr1")
    assert rc == 0 and job.calls()[-1] == "scontrol requeue 4242", (job.calls(), out, err)


@pytest.mark.parametrize("value, word", [("USR2", "USR2"), ("SIGUSR1 SIGKILL", "SIGKILL"), ("USR1;TERM", "USR1;TERM"),
                                         ("15", "15")])
def test_an_unknown_requeue_signal_stops_the_job_before_preflight_and_srun(tmp_path, value, word):
    job, rc, out, err = _fake_job(tmp_path, REQUEUE_SIGNALS=value)
    assert rc == 2, (out, err)
    assert (f"train.sbatch: error: REQUEUE_SIGNALS=\"{value}\": '{word}' is not a signal the job can requeue on; "
            "valid: USR1, TERM") in err
    assert job.argv("preflight") is None and job.argv("srun") is None
    job, rc, out, err = _fake_job(tmp_path, REQUEUE_SIGNALS=" , ")
    assert rc == 2 and "REQUEUE_SIGNALS=\" , \" names no signal; valid: USR1, TERM" in err, err


def _signal_during_preflight(tmp_path, sig, script="train.sbatch", **variables):
    job = FakeJob(tmp_path, script, FAKE_PREFLIGHT_WAIT="1", **variables)
    job.wait_for("preflight.started")
    job.proc.send_signal(sig)
    (job.dir / "preflight.release").touch()
    return (job, *job.finish())


def test_a_requeue_signal_before_the_ranks_start_requeues_without_starting_them(tmp_path):
    """A USR1 (or TERM) reaching the batch script during start-up, before srun_with_requeue's traps, killed it
    (rc 138/143): no checkpoint, no requeue. Now the script requeues the job at once (nothing trained yet to
    save) or, for a signal it does not requeue on, exits 128 + its number; srun never starts."""
    job, rc, out, err = _signal_during_preflight(tmp_path, signal.SIGUSR1)
    assert rc == 0, (out, err)
    assert "train.sbatch: got SIGUSR1 before the ranks started: not starting them; requeueing job 4242" in out
    assert job.calls()[-1] == "scontrol requeue 4242" and job.argv("srun") is None
    job, rc, out, err = _signal_during_preflight(tmp_path, signal.SIGTERM, "train_deepspeed.sbatch",
                                                 GPUS_PER_NODE="2", REQUEUE_SIGNALS="SIGUSR1,SIGTERM")
    assert rc == 0 and job.calls()[-1] == "scontrol requeue 4242" and job.argv("srun") is None, (out, err)
    assert "train_deepspeed.sbatch: got SIGTERM before the ranks started" in out


def test_a_term_before_the_ranks_start_ends_the_job_143_without_requeue(tmp_path):
    job, rc, out, err = _signal_during_preflight(tmp_path, signal.SIGTERM)
    assert rc == 143, (out, err)
    assert ("train.sbatch: got SIGTERM before the ranks started: not starting them; not requeueing "
            "(REQUEUE_SIGNALS=USR1); exit 143") in out
    assert "scontrol requeue 4242" not in job.calls() and job.argv("srun") is None
    job, rc, out, err = _signal_during_preflight(tmp_path, signal.SIGUSR1, REQUEUE_SIGNALS="TERM")
    assert rc == 138 and "got SIGUSR1 before the ranks started" in out and job.argv("srun") is None, (out, err)


def test_scontrol_failing_to_expand_the_nodelist_is_named_with_its_own_error(tmp_path):
    """Its stderr was dropped (hostfile.py: only 'returned non-zero exit status 1'), and common.sh's own error
    could never print: the failing assignment ended the script under set -e first (exit 1)."""
    broken = "Unable to contact slurm controller (connect failure)"
    job, rc, out, err = _fake_job(tmp_path, FAKE_SCONTROL_ERROR=broken)
    assert rc == 2, (out, err)
    assert f"scontrol: error: {broken}" in err
    assert "train.sbatch: error: could not expand SLURM_JOB_NODELIST=n[1-2] with scontrol" in err
    assert job.argv("srun") is None
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", HOSTFILE=str(hostfile),
                                  FAKE_SCONTROL_ERROR=broken)
    assert rc == 2, (out, err)
    assert (f"error: cannot expand SLURM_JOB_NODELIST='n[1-2]': scontrol show hostnames exited 1: scontrol: "
            f"error: {broken}") in err
    assert job.argv("preflight") is None and job.argv("srun") is None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_rank_env_ignores_stop_signals_until_the_command_runs_and_needs_a_command(sig):
    """launch/slurm/rank_env.sh execs the rank's command with USR1 and TERM ignored (the disposition survives
    exec): a signal a shell command sends itself ($$: the process rank_env.sh became) leaves it running to print
    "alive", where the same command run directly is killed by it (the oracle: the default disposition). TERM:
    common.sh sends a stop again until the ranks listen, and one landing before launch/train.py's first lines
    killed the rank (the job then failed, unsaved and not requeued). With the SLURM variables set and no
    command, exit 2 naming "no command given" (a mutation trial found both untested)."""
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4", MASTER_ADDR="n1", MASTER_PORT="29501")
    command = ["sh", "-c", f"kill -{sig.name[3:]} $$; echo alive"]
    default = dict(preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))  # whatever pytest inherited
    direct = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, **default)
    assert direct.returncode == -sig and direct.stdout == ""
    proc = subprocess.run([str(ROOT / "launch/slurm/rank_env.sh"), *command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, **default)
    assert proc.returncode == 0 and proc.stdout == "alive\n", (proc.returncode, proc.stderr)
    proc = subprocess.run([str(ROOT / "launch/slurm/rank_env.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "rank_env.sh: error: no command given\n", proc.stderr


# --- Edges of train_deepspeed.sbatch and of the signal forwarding (a review's suspicions, reproduced first).

@pytest.mark.parametrize("words, option", [("--exclude n1", "--exclude"), ("--include=n2:0", "--include"),
                                           ("-i n1", "--include"), ("--incl n1@n2", "--include"),
                                           ("--bind_cores_to_rank --num_gpus 1", "--num_gpus"),
                                           ("--num_nodes=1", "--num_nodes"), ("-Hother_hostfile", "--hostfile"),
                                           ("--master_port 1234", "--master_port")])
def test_deepspeed_launcher_args_that_pick_hosts_or_gpus_stop_the_job_before_preflight(tmp_path, words, option):
    """DS_LAUNCHER_ARGS="--exclude n1" reached every node's launcher, which with --no_ssh reads --node_rank as an
    index into the hosts left after the filter: n1 (node rank 0) started n2's ranks with WORLD_SIZE 2 (preflight
    had checked 4) and n2's launcher failed "--node_rank is not set correctly" (seen with DeepSpeed 0.19.8's
    runner under ds_node.sh). Such options, and those the script sets itself, now stop the job up front, named
    with what to use instead; argparse's abbreviations and short forms are DeepSpeed's (-i is --include)."""
    job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", GPUS_PER_NODE="2", DS_LAUNCHER_ARGS=words)
    assert rc == 2, (out, err)
    assert f"DS_LAUNCHER_ARGS={words!r}: " in err and option in err, err
    assert job.argv("preflight") is None and job.argv("srun") is None


def test_gpus_per_job_spread_over_nodes_is_refused_where_the_hostfile_would_assume_one_count(tmp_path):
    """sbatch --gpus=5 --nodes=2 may give the nodes 3 and 2 GPUs; SLURM_GPUS_ON_NODE is the batch node's 3, and
    the generated hostfile said slots=3 for both (world 6: n2's third rank on a GPU it does not have). Without
    GPUS_PER_NODE, the count is taken from SLURM only where the request fixes one per node."""
    uneven = dict(SLURM_GPUS_ON_NODE="3", SLURM_GPUS="5")
    job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", **uneven)
    assert rc == 2, (out, err)
    assert ("SLURM_GPUS_ON_NODE=3 is this node's GPU count, but the job asked for its GPUs with --gpus "
            "(SLURM_GPUS=5)") in err and "--gpus-per-node" in err and "GPUS_PER_NODE" in err, err
    assert job.argv("preflight") is None and job.argv("srun") is None
    # --gpus-per-task with 2 tasks on one node, 1 on the other (SLURM_TASKS_PER_NODE "2,1"), or per socket
    for variables, flag in ((dict(SLURM_GPUS_PER_TASK="1", SLURM_TASKS_PER_NODE="2,1"), "--gpus-per-task"),
                            (dict(SLURM_GPUS_PER_SOCKET="1"), "--gpus-per-socket")):
        job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", SLURM_GPUS_ON_NODE="2", **variables)
        assert rc == 2 and f"with {flag} (SLURM_GPUS_PER_" in err, (out, err)
    # a count per node (--gpus-per-node; --gres=gpu:3, which sets none of these; --gpus-per-task with one task on
    # each node), or the user's GPUS_PER_NODE
    for variables, slots in ((dict(uneven, SLURM_GPUS_PER_NODE="3"), 3), (dict(SLURM_GPUS_ON_NODE="3"), 3),
                             (dict(SLURM_GPUS_ON_NODE="3", SLURM_GPUS_PER_TASK="3", SLURM_TASKS_PER_NODE="1(x2)"), 3),
                             (dict(uneven, GPUS_PER_NODE="2"), 2)):
        job, rc, out, err = _fake_job(tmp_path, "train_deepspeed.sbatch", **variables)
        assert rc == 0, (variables, out, err)
        assert (job.run_dir / "hostfile-4242").read_text() == f"n1 slots={slots}\nn2 slots={slots}\n"
        assert job.argv("preflight")[:3] == ["launch/preflight.py", "--world-size", str(2 * slots)]


@pytest.mark.parametrize("script", ["train.sbatch", "train_deepspeed.sbatch"])
def test_a_stop_signal_before_the_step_listens_is_sent_again_until_it_is_heard(tmp_path, script):
    """USR1 reaching the batch script after srun_with_requeue's traps but before the step's ranks listen (SLURM
    still creating the step: scancel then exits 0 and signals nothing, seen on the local cluster; or the
    launcher and rank_env.sh ignoring USR1 until launch/train.py's first lines) was lost: the ranks then trained
    to the time limit and the job was killed unsaved. The script now sends it again every STOP_RESEND_S until
    the ranks show they listen (the trainer's run_info.jsonl line), so the rank stops and the job requeues."""
    job = FakeJob(tmp_path, script, FAKE_RANK="1", FAKE_SRUN_WAIT="1", STOP_RESEND_S="0.2", GPUS_PER_NODE="2")
    job.wait_for("srun.started")
    job.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while "scancel --signal=USR1 4242" not in job.calls():  # forwarded to a step that cannot hear it yet
        assert time.monotonic() < deadline and job.proc.poll() is None, (job.calls(), job.proc.poll())
        time.sleep(0.02)
    (job.dir / "srun.release").touch()
    rc, out, err = job.finish()
    assert rc == 0, (out, err)
    assert (job.run_dir / "metrics.jsonl").read_text() == '{"event": "preempted", "step": 7}\n'
    assert job.calls()[-1] == "scontrol requeue 4242" and "requeueing job 4242" in out, (job.calls(), out)


@pytest.mark.parametrize("value", ["0", "0.0", "5s", "-1"])
def test_a_stop_resend_interval_that_is_not_a_positive_number_stops_the_job_before_preflight(tmp_path, value):
    job, rc, out, err = _fake_job(tmp_path, STOP_RESEND_S=value)
    assert rc == 2 and f'STOP_RESEND_S="{value}" is not a positive number of seconds (e.g. 5 or 0.5)' in err, err
    assert job.argv("preflight") is None and job.argv("srun") is None


def test_a_stop_signal_to_ranks_already_listening_is_sent_once(tmp_path):
    """Ranks that showed they listen get the stop once, not again while they save (each signal interrupts the
    ranks' system calls)."""
    job, rc, out, err = _signal_mid_run(tmp_path, signal.SIGUSR1, STOP_RESEND_S="0.2", FAKE_SAVE_S="1.5")
    assert rc == 0, (out, err)
    assert [c for c in job.calls() if c.startswith("scancel")] == ["scancel --signal=USR1 4242"], job.calls()
    assert job.calls()[-1] == "scontrol requeue 4242", job.calls()
