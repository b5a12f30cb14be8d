"""launch/slurm/*.sbatch on a real one-node SLURM (Debian's slurmctld/slurmd/munge, installed if missing):
a 2-rank USR1 checkpoint-requeue-resume-export, the deepspeed --hostfile --no_ssh variant, and jobs that
must stop before any rank starts. Set RELORA_SKIP_SLURM=1 to skip these (documented in README.md, "Running on
a cluster"); without it, a machine where SLURM cannot be installed or started fails here with the reason. The
jobs train in fp32 (ds_configs/zero2_fp32.json): the subject is the launch, and bf16 on a CPU without native
bf16 matmul made these jobs several times slower (bf16 training is tested in test_trainer*.py and
test_int8_zero.py). The same scripts under stand-in srun/scontrol/scancel: tests/test_cluster_slurm_standin.py."""
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from launch_utils import ROOT, launch_env

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
from local_slurm import LocalSlurm  # noqa: E402

# tiny.yaml shortened: switch to ReLoRA at 8, resets at 16 and 24, eval at 15 and 30, checkpoints every 10.
SHORT = ("--total-steps 30 --warm-start-steps 8 --cycle-length 8 --restart-warmup-steps 3 --warmup-steps 4 "
         "--eval-every 15 --eval-windows 16 --save-every 10 --micro-batch-size 4 --global-batch-size 8 --seq-len 64")
ONE_NODE = ["--nodes=1", "--gpus-per-node=0"]  # this cluster has 2 CPUs and no GPUs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request):
    if os.environ.get("RELORA_SKIP_SLURM") == "1":
        pytest.skip("RELORA_SKIP_SLURM=1")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(cluster.stop)  # also after a failed start: stop whatever did start
    return cluster.start()


def _submit(slurm, tmp_path, script, *options, node=tuple(ONE_NODE), **variables):
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": sys.executable, "RECIPE": "launch/configs/tiny.yaml", "DS_CONFIG": "ds_configs/zero2_fp32.json",
                "OUTPUT_DIR": str(tmp_path / "run"), "TRAIN_ARGS": SHORT, **variables})
    return slurm.submit(ROOT / "launch/slurm" / script, *node, f"--output={tmp_path}/%x-%j.out", *options,
                        env=env, cwd=ROOT)


def _log(tmp_path, job_id) -> str:
    return next(tmp_path.glob(f"*-{job_id}.out")).read_text(errors="replace")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_finished(info, log):
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n--- job log\n{log[-5000:]}"


def _wait_for_step(slurm, job, run_dir: Path, step: int):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            f"job {job} never reached step {step}: {slurm.job(job)}"
        time.sleep(0.1)


# 60 steps: the signal, sent once step 10 is logged, must land before the last step; at 40 steps a slow
# scancel on a loaded machine could miss the run (a step takes ~0.2 s on 2 CPU cores; the signal landed
# one step after it was sent).
LONGER = SHORT.replace("--total-steps 30", "--total-steps 60").replace("--save-every 10", "--save-every 100")


def test_srun_job_checkpoints_on_usr1_requeues_resumes_and_exports(slurm, tmp_path):
    """train.sbatch, 2 ranks by srun: USR1 past the switch to ReLoRA checkpoints, the job requeues and the
    resumed run trains every step once through its resets, then exports."""
    job = _submit(slurm, tmp_path, "train.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1", TRAIN_ARGS=LONGER)
    _wait_for_step(slurm, job, tmp_path / "run", 10)  # past the switch to ReLoRA
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch script only.
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    _assert_finished(info, log)
    assert info["Restarts"] == "1", info
    assert f"train.sbatch: job {job} restart 0: 2 rank(s) on 1 node(s)" in log
    assert "2 rank(s), bf16=False, ZeRO stage 2, offload: none, 60 steps" in log  # the trainer's own count of ranks
    recs = _records(tmp_path / "run")
    stopped = [r["step"] for r in recs if r.get("event") == "preempted"]
    assert len(stopped) == 1 and 10 <= stopped[0] < 60, (stopped, log[-3000:])
    n = stopped[0]
    assert re.search(rf"stopped by signal 10 after step {n}; checkpoint saved", log)
    # The checkpoint first, no evaluation before the stop; a step due one (eval_every 15) is evaluated first
    # by the resumed run.
    preempted = recs.index({"event": "preempted", "step": n})
    evals_at_n = [i for i, r in enumerate(recs) if "val_loss" in r and r["step"] == n]
    assert len(evals_at_n) == (n % 15 == 0) and all(i > preempted for i in evals_at_n), recs
    assert f"requeueing job {job}" in log and f"job {job} restart 1: 2 rank(s)" in log
    assert f"resumed from {tmp_path}/run/checkpoints/step_{n} at step {n}" in log
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 61)), steps  # every step once: nothing lost, nothing repeated
    assert [r["step"] for r in recs if r.get("event") == "reset"] == list(range(16, 61, 8))
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_60"
    assert (tmp_path / "run/hf/config.json").is_file()


def test_term_to_the_batch_script_checkpoints_without_requeue(slurm, tmp_path):
    # srun answers SIGTERM by SIGKILLing its tasks: the script must reach the ranks without it.
    job = _submit(slurm, tmp_path, "train.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1",
                  TRAIN_ARGS=LONGER + " --no-export")
    _wait_for_step(slurm, job, tmp_path / "run", 5)
    slurm.run("scancel", "--batch", "--signal=TERM", job)
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    _assert_finished(info, log)
    assert info["Restarts"] == "0" and "not requeueing (REQUEUE_SIGNALS=USR1)" in log, info
    n = [r["step"] for r in _records(tmp_path / "run") if r.get("event") == "preempted"]
    assert len(n) == 1 and (tmp_path / "run/checkpoints/latest").read_text() == f"step_{n[0]}" and n[0] < 60


def test_usr1_during_start_up_requeues_the_job_before_any_rank_starts(slurm, tmp_path):
    """USR1 to the batch script while preflight runs (before srun_with_requeue's traps): it killed the script
    (138) and the job ended without a requeue. Now the job requeues itself without starting the ranks, and the
    restart trains. PYTHON is a wrapper that sends the signal from preflight on the first start."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == launch/preflight.py && "${{SLURM_RESTART_COUNT:-0}}" == 0 ]]; then
    scancel --batch --signal=USR1 "$SLURM_JOB_ID" && sleep 1
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    job = _submit(slurm, tmp_path, "train.sbatch", "--ntasks-per-node=1", "--cpus-per-task=1", PYTHON=str(wrapper),
                  TRAIN_ARGS=SHORT + " --no-export")
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    _assert_finished(info, log)
    assert info["Restarts"] == "1", info
    assert f"train.sbatch: got SIGUSR1 before the ranks started: not starting them; requeueing job {job}" in log
    assert f"job {job} restart 1: 1 rank(s)" in log
    assert log.count("1 rank(s), bf16=False") == 1, log[-3000:]  # the trainer's start-up line: the restart's only
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == list(range(1, 31))


def test_deepspeed_launcher_variant_checkpoints_on_term(slurm, tmp_path):
    """The deepspeed-launcher job, TERM sent to the batch script mid-run (as scancel or the time limit do): the
    script forwards it to every process of the step, the launchers among them. A review found the node's
    deepspeed runner, the step's top process, dying of that TERM at once, after which SLURM kills what is
    left of the step: the ranks never saved. The runner now ignores TERM and waits for its ranks."""
    # Submitted as on a cluster without GPU gres: no --gpus-per-node anywhere (the script asks for none).
    job = _submit(slurm, tmp_path, "train_deepspeed.sbatch", "--ntasks-per-node=1", "--cpus-per-task=2",
                  node=("--nodes=1",), GPUS_PER_NODE="2", TRAIN_ARGS=LONGER + " --no-export")
    _wait_for_step(slurm, job, tmp_path / "run", 5)
    slurm.run("scancel", "--batch", "--signal=TERM", job)
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    _assert_finished(info, log)
    assert (tmp_path / f"run/hostfile-{job}").read_text() == "localhost slots=2\n"
    assert re.search(r"master localhost:\d+", log)  # the start-up line names the rendezvous host
    assert "2 rank(s), bf16=False, ZeRO stage 2, offload: none, 60 steps" in log
    n = [r["step"] for r in _records(tmp_path / "run") if r.get("event") == "preempted"]
    assert len(n) == 1 and (tmp_path / "run/checkpoints/latest").read_text() == f"step_{n[0]}" and n[0] < 60


def test_deepspeed_launcher_variant_stops_on_a_usr1_sent_while_the_launcher_starts(slurm, tmp_path):
    """USR1 to the batch script while the node's deepspeed launcher starts (seconds of imports, with USR1
    ignored until launch/train.py's first lines): forwarded once, it was lost, and the job trained all its
    steps as if never asked to stop (at a time limit: killed unsaved). Now it is sent again until the ranks
    listen: they stop, the job requeues, and the restart trains every step once. PYTHON is a wrapper that,
    on the first start, sends the signal as the launcher starts and holds the launcher back 3 s."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m deepspeed.launcher.runner" && "${{SLURM_RESTART_COUNT:-0}}" == 0 ]]; then
    scancel --batch --signal=USR1 "$SLURM_JOB_ID" && sleep 3
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    job = _submit(slurm, tmp_path, "train_deepspeed.sbatch", "--ntasks-per-node=1", "--cpus-per-task=2",
                  node=("--nodes=1",), GPUS_PER_NODE="2", PYTHON=str(wrapper), STOP_RESEND_S="1",
                  TRAIN_ARGS=SHORT + " --no-export")
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    _assert_finished(info, log)
    assert info["Restarts"] == "1", (info, log[-3000:])
    recs = _records(tmp_path / "run")
    stopped = [r["step"] for r in recs if r.get("event") == "preempted"]
    assert len(stopped) == 1 and stopped[0] < 30, (stopped, log[-3000:])
    assert f"requeueing job {job}" in log and f"job {job} restart 1: 2 rank(s)" in log
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 31))


def test_bad_batch_arithmetic_stops_the_job_before_any_rank(slurm, tmp_path):
    job = _submit(slurm, tmp_path, "train.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1",
                  TRAIN_ARGS=SHORT.replace("--global-batch-size 8", "--global-batch-size 12"))
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    assert "global_batch_size=12 is not divisible by micro_batch_size=4 x world_size=2" in log
    assert "rank(s), bf16" not in log and not (tmp_path / "run").exists()
    # GPU_MEMORY_GB reaches preflight only (launch/train.py has no such flag): 1 GB leaves nothing after the reserve
    job = _submit(slurm, tmp_path, "train.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1",
                  DS_CONFIG="ds_configs/zero2.json", GPU_MEMORY_GB="1")
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    assert "--gpu-memory-gb 1 leaves nothing usable after the reserve" in log, log[-3000:]
    assert "rank(s), bf16" not in log and not (tmp_path / "run").exists()


def test_hostfile_naming_a_host_outside_the_job_is_an_error(slurm, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\ngpu-node-7 slots=2\n")
    job = _submit(slurm, tmp_path, "train_deepspeed.sbatch", "--ntasks-per-node=1", "--cpus-per-task=2",
                  HOSTFILE=str(hostfile))
    info = slurm.wait(job)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    assert f"unknown host(s) gpu-node-7: not nodes of SLURM job {job} (its nodes: localhost)" in log
