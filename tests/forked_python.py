"""``python -u script args`` for the tests' ranks, started as a fork of one interpreter per test process that
has already imported torch, torch._dynamo and DeepSpeed (~3 s of CPU in every rank otherwise, 178 ranks in
one run of the suite: BENCHMARKS.md "Rank start-up and the test command"). PyTorch's own distributed tests
fork their ranks too (MultiProcessTestCase). RELORA_TESTS_FORK_RANKS=0 starts every script as a subprocess.

The fork runs the script as a fresh interpreter would (tests/test_forked_python.py holds it to that): the
environment (with what the preloaded imports set in it, as they would), sys.argv, sys.path (as Python builds
it for that script in that environment), the working directory, a new session, unbuffered stdout and stderr
on the files given, numpy's global generator seeded afresh, and at the end Python's own exit (non-daemon
threads joined, atexit functions, SystemExit's status, or 1 after a traceback). What a fork cannot redo is
what the three modules did at import, in the server's environment: so only a script whose environment is the
server's, as those imports see it, but for the variables read at run time only (_PER_RUN), is forked; any
other starts as a subprocess (``forkable``)."""
import atexit
import io
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.reduction import DupFd
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "deepspeed")
# Read at run time only, never by the preloaded modules' import: what launchers set per rank, pytest per test,
# the address torch's compiler hands its own compiled module through the environment, the terminal's size
# (GNU readline, once loaded, sets LINES and COLUMNS where os.environ does not see them, and a forkserver
# started from there inherits them) and this project's variables (RELORA_*: relora_ds is not preloaded).
_PER_RUN = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "CROSS_RANK",
                      "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "PYTEST_CURRENT_TEST",
                      "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "LINES", "COLUMNS"})

_wanted_env: dict | None = None  # the environment to start the server in (use_environment)
_server_env: dict | None = None  # the one it started in, as /proc reads it (before its imports), once started
_sys_paths: dict[tuple, list[str]] = {}


def _import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in _PER_RUN and not k.startswith("RELORA_")}


def _as_imported(env: dict) -> dict:
    """What the preloaded imports see of ``env``: two variables are read there as the import itself sets them
    where unset, and a test process that imported the same modules passes them on set: DeepSpeed's
    PYTORCH_NVML_BASED_CUDA_CHECK (set to 1) and torch's compiler's cache folder (torch._dynamo's import
    places its DynamoCache there: cache_dir(), the variable or the user's default, made absolute)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = _import_time_env(env)
    cache = env.get("TORCHINDUCTOR_CACHE_DIR")
    return {**env, "PYTORCH_NVML_BASED_CUDA_CHECK": env.get("PYTORCH_NVML_BASED_CUDA_CHECK", "1"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.abspath(default_cache_dir() if cache is None else cache)}


def use_environment(env: dict) -> None:
    """The environment to start the server in, at the first fork (tests/launch_utils.py gives the test
    session's own, as the tests import it)."""
    global _wanted_env
    assert _server_env is None, "the server is already running in its environment"
    _wanted_env = _import_time_env(env)


def forkable(env: dict) -> bool:
    """Whether ``python script`` in ``env`` may start as a fork: the server's environment, as its imports saw
    it (_as_imported), is the script's less the per-run variables. Starts the server at the first ask."""
    import torch

    if os.environ.get("RELORA_TESTS_FORK_RANKS", "1") == "0" or _wanted_env is None:
        return False
    if torch.version.cuda or torch.version.hip:
        # A GPU build: an import that asks for the devices (torch.cuda.is_available()) sets up the driver in the
        # server, and a fork of it cannot use the GPU. The CPU machines are what the forks are for.
        return False
    if _server_env is None:
        _start_server()
    return _as_imported(env) == _as_imported(_server_env)


def _start_server() -> None:
    """The forkserver, started with os.environ set to _wanted_env, preloading PRELOAD. What it started with is
    read back from /proc: it also inherits what C code put in this process's environment unseen by
    os.environ (GNU readline's LINES and COLUMNS)."""
    global _server_env
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_wanted_env)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    proc = f"/proc/{forkserver._forkserver._forkserver_pid}"
    deadline = time.monotonic() + 60
    while b"multiprocessing.forkserver" not in Path(f"{proc}/cmdline").read_bytes():  # until its exec
        assert time.monotonic() < deadline, "the forkserver did not start within 60 s"
        time.sleep(0.01)
    environ = Path(f"{proc}/environ").read_bytes().split(b"\0")
    _server_env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)


def _script_sys_path(script: str, env: dict, cwd) -> list[str]:
    """sys.path of ``python script`` in ``env``: the script's folder, then what Python adds (PYTHONPATH, the
    standard library, site-packages and its .pth entries), asked of a Python started so once per PYTHONPATH."""
    key = (env.get("PYTHONPATH"), env.get("PYTHONHOME"), env.get("PYTHONNOUSERSITE"), str(cwd))
    if key not in _sys_paths:
        out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"], env=env,
                             cwd=cwd, capture_output=True, text=True, check=True).stdout
        _sys_paths[key] = json.loads(out)
    return [os.path.dirname(os.path.abspath(os.path.join(cwd, script))), *_sys_paths[key]]


class _Fd:
    """A file descriptor handed to the fork: duplicated into it while the process is pickled for the server
    (multiprocessing's DupFd, as it hands over a Connection's)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _stdio(fd: int, errors: str) -> io.TextIOWrapper:
    """An unbuffered text stream on ``fd``, as ``python -u`` makes sys.stdout and sys.stderr."""
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=sys.stdout.encoding, errors=errors,
                            write_through=True)


def _exit_status(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _run_script(argv, env, server_env, cwd, sys_path, stdout, stderr, new_session) -> None:
    """In the fork: become ``python -u argv`` in ``env`` and exit as it would."""
    if new_session:
        os.setsid()
    for target, fd in ((1, stdout), (2, stderr)):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    # What the preloaded imports wrote into the server's environment (DeepSpeed's PYTORCH_NVML_BASED_CUDA_CHECK,
    # torch's compiler's cache folder), each only where unset, they would write into the script's.
    imported = {k: v for k, v in os.environ.items() if server_env.get(k) != v}
    os.environ.clear()
    os.environ.update({**imported, **env})
    os.chdir(cwd)
    sys.path[:] = sys_path
    sys.argv = list(argv)
    sys.stdout = sys.__stdout__ = _stdio(1, "strict")
    sys.stderr = sys.__stderr__ = _stdio(2, "backslashreplace")
    if "numpy.random" in sys.modules:  # a fresh interpreter seeds numpy's global generator from the OS
        sys.modules["numpy.random"].seed()
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = _exit_status(e)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:  # Python's own exit
        threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_status(e)
    except BaseException:
        traceback.print_exc()
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class ForkedPython:
    """A started script, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, script, args, *, env: dict, cwd, stdout, stderr, start_new_session: bool = False):
        assert forkable(env), "start it as a subprocess: its environment differs from the server's"
        argv = [str(script), *map(str, args)]
        self._process = multiprocessing.get_context("forkserver").Process(
            target=_run_script, name=f"python {argv[0]}", daemon=False,
            args=(argv, dict(env), _server_env, str(cwd), _script_sys_path(argv[0], env, cwd), _Fd(stdout.fileno()),
                  _Fd(stderr.fileno()), start_new_session))
        self._process.start()
        self.pid = self._process.pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"python {self._process.name}", timeout)
        return self.returncode
