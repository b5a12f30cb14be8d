"""What a kill-and-resume fuzz (SIGKILL to one or every rank of 2-rank ZeRO-2/3 runs of the tiny recipe, at random
moments, repeated, resumed on the same and on 1 rank) found: resumes continued bit for bit; one thing a kill leaves
behind. DeepSpeed's CPU allreduce segments (/dev/shm, 66 MiB a rank) are unlinked once every rank has mapped them
(relora_ds/distributed.py); a kill before that -- a rank waiting in DeepSpeed's shm_initialize for a slower rank
-- leaves them in RAM until the node reboots, 66 MiB more each time a job is killed in that window."""
import glob
import os
import signal
import textwrap
import time

from launch_utils import ROOT, free_port, launch_env, start_python

# Rank 1 joins the process group, then stalls before DeepSpeed's shm_initialize: rank 0 has made its segment
# and waits there for rank 1's, the window a kill during start-up lands in.
_START = textwrap.dedent("""
    import importlib, os, sys, time
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (`import deepspeed.comm.torch as` gives torch)
    if os.environ["RANK"] == "1" and sys.argv[1] == "stall":
        build = ds_torch.build_shm_op

        class Stalled:
            def __init__(self, op):
                self.op = op

            def initialize(self, *args):
                time.sleep(600)

            def __getattr__(self, name):
                return getattr(self.op, name)
        ds_torch.build_shm_op = lambda: Stalled(build())
    import torch.distributed as dist
    from relora_ds.distributed import init_distributed
    init_distributed(dist_backend="gloo", distributed_port=int(os.environ["MASTER_PORT"]))
    dist.destroy_process_group()
""")


def _start(script, mode, port, log):
    # (LOCAL_SIZE: the deepspeed launcher's, without which DeepSpeed makes no segment)
    env = {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    return [start_python(script, [mode], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, stdout=log,
                         stderr=log, start_new_session=True) for r in range(2)]


def test_a_start_after_ranks_killed_in_start_up_removes_the_shm_segments_they_left(tmp_path):
    """SIGKILL to both ranks while rank 0 waits in shm_initialize leaves its segment (no handler runs). The next
    run started on the node removes a segment no process maps that is older than a minute (a live run's start-up
    maps its own from the moment it makes it); the leftover is aged here rather than waited for."""
    script = tmp_path / "start.py"
    script.write_text(_START)
    port = free_port()
    stale = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    log = (tmp_path / "ranks.log").open("w")
    ranks = _start(script, "stall", port, log)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(stale) and time.monotonic() < deadline and all(p.poll() is None for p in ranks):
            time.sleep(0.05)
        assert os.path.exists(stale), "rank 0 never made its segment"
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    try:
        assert os.path.exists(stale), "the segment of the killed start-up is gone before any other run started"
        os.utime(stale, (time.time() - 3600,) * 2)
        ranks = _start(script, "plain", free_port(), log)  # another run on the node (a requeue gets another port)
        assert [p.wait(timeout=120) for p in ranks] == [0, 0], (tmp_path / "ranks.log").read_text()[-3000:]
        assert not os.path.exists(stale), f"{stale} (66 MiB of RAM) is still there after the next run's start"
    finally:
        log.close()
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
            os.unlink(path)  # this test's own, whatever the outcome
