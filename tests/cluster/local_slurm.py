"""A real one-node SLURM cluster on localhost for tests: Debian's slurmctld/slurmd/munge, no systemd.

    python tests/cluster/local_slurm.py DIR      # start, print the SLURM_CONF to export, stop on Enter

Everything it starts lives under its directory (config, state, spool, logs; the munge key, socket and
log under a /tmp directory of user munge, removed at stop) and
listens on free ports, so two instances (or a system SLURM) do not meet. Daemons run in the foreground
as our children and are stopped by pid. Needs root (slurmd runs jobs as their submitting user).
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def _free_port() -> int:
    """tests/launch_utils.py's pick (below the ephemeral range, a block per xdist worker): the daemons bind
    these ports seconds later, while the other worker's ranks open connections."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch_utils import free_port
    return free_port()


def ensure_installed(timeout: int = 300) -> None:
    """apt-get install the Debian packages unless their binaries are already on PATH."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(b for b in BINARIES if not shutil.which(b))}) "
                               "and not root, so cannot apt-get install " + " ".join(PACKAGES))
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM binaries missing and no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                                   f"{proc.stderr[-2000:]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but {missing} still not on PATH")


class LocalSlurm:
    """One node named ``localhost`` with ``cpus`` CPUs in partition ``debug``; job requeue enabled."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_dir: Path | None = None

    @property
    def env(self) -> dict:
        """Environment for sbatch/squeue/scontrol against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 180) -> "LocalSlurm":  # a loaded 2-core CI machine: daemons start slowly
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local slurmd must run as root (it starts jobs as their users)")
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged runs as user munge, which must reach its directory: not under pytest's root-only 0700 tmp.
        munge = pwd.getpwnam("munge")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="relora-munge-"))
        m = self.munge_dir
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        for p in (m, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        socket_path = m / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", "--force",
                               f"--socket={socket_path}", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: socket_path.exists(), timeout, "munged socket")
        self.conf.write_text(self._config(socket_path))
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(self._idle, timeout, "node localhost idle in sinfo")
        return self

    def _config(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=relora-ci",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            # A requeued job may start cred_expire+1 s later (default 120): keep that short for tests.
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            "SlurmUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in containers
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # trust CPUs= below even on a smaller machine
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            "SchedulerParameters=sched_interval=2",  # periodic pass (default 60 s) picks up requeued jobs
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=10",  # scancel: SIGTERM, then SIGKILL 10 s later
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            ""])

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, **kw)
        log.close()

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited {proc.returncode} while starting:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        munge_logs = sorted(self.munge_dir.glob("*.log")) if self.munge_dir else []
        for f in sorted((self.root / "log").glob("*")) + munge_logs:
            try:
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def run(self, *cmd, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr}")
        return proc

    def submit(self, script, *options, env: dict, cwd) -> str:
        """sbatch a script (the submitting environment is the job's: sbatch --export=ALL); returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *map(str, options), str(script)], env={**env, **self.env_only},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {script} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    @property
    def env_only(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job reaches a final state (sbatch --wait polls at 2, 4, 8... s: slow for tests)."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in self.FINAL:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s")
            time.sleep(poll)
        return info

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged (in that order) by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 20  # KillWait + margin: let slurmstepd end the job's processes
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None


if __name__ == "__main__":
    cluster = LocalSlurm(Path(sys.argv[1]).resolve()).start()
    print(f"export SLURM_CONF={cluster.conf}\n(Enter stops the cluster)")
    try:
        input()
    finally:
        cluster.stop()
