"""tests/forked_python.py starts the tests' ranks as forks of a preloaded interpreter: each must behave as the
``python -u script`` it stands for. The oracle is that command, run as a subprocess on the same script."""
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import forked_python
from launch_utils import ROOT, launch_env, start_python

PROBE = r'''
import atexit, json, os, sys, threading, time
mode = sys.argv[1]
atexit.register(lambda: print("atexit ran", flush=True))
import numpy
if mode == "plain":  # the environment as the preloaded imports leave it
    import torch, torch._dynamo, deepspeed
print(json.dumps({
    "argv": sys.argv, "path": sys.path, "cwd": os.getcwd(), "name": __name__, "file": __file__,
    "env": dict(os.environ) if mode == "plain" else None, "session_leader": os.getsid(0) == os.getpid(),
    "numpy": numpy.random.random(),
}))
print("to stderr", file=sys.stderr)
threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined"))).start()  # not a daemon
if mode == "unflushed":
    print("written before os._exit")
    os._exit(5)
if mode == "exit3":
    sys.exit(3)
if mode == "exitmsg":
    sys.exit("a message for stderr")
if mode == "raise":
    raise ValueError("boom")
if mode == "term":
    os.kill(os.getpid(), 15)
    time.sleep(30)
'''


def _run(start, script, mode, env):
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start(script, [mode], env=env, cwd=script.parent, stdout=out, stderr=err, start_new_session=True)
        code = proc.wait(timeout=120)
        out.seek(0), err.seek(0)
        return code, out.read(), err.read()


def _subprocess(script, args, *, env, **kwargs):
    return subprocess.Popen([sys.executable, "-u", str(script), *args], env=env, **kwargs)


@pytest.mark.parametrize("mode", ["plain", "unflushed", "exit3", "exitmsg", "raise", "term"])
def test_a_forked_script_runs_and_exits_as_python_runs_it(tmp_path, mode):
    """The same sys.argv, sys.path, working directory, environment (with what the preloaded imports set, as
    they would set it), __main__, new session, unbuffered output, stdout and stderr, exit status (SystemExit's
    code or message, a traceback's 1, a signal's), atexit functions and non-daemon threads at the end."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    assert forked_python.forkable(launch_env())  # (starts the server)
    # Without the two variables the preloaded imports set where unset (this process, having imported them, has
    # them set), unless the server started with them set (the user's TORCHINDUCTOR_CACHE_DIR).
    env = {k: v for k, v in launch_env().items()
           if k not in ("PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR") or k in forked_python._server_env}
    env.update(RANK="1", RELORA_PROBE="x")
    assert forked_python.forkable(env)
    forked = _run(forked_python.ForkedPython, script, mode, env)
    fresh = _run(_subprocess, script, mode, env)
    assert forked[0] == fresh[0] == {"plain": 0, "unflushed": 5, "exit3": 3, "exitmsg": 1, "raise": 1,
                                     "term": -signal.SIGTERM}[mode]
    (f_facts, *f_rest), (p_facts, *p_rest) = forked[1].splitlines(), fresh[1].splitlines()
    f_facts, p_facts = json.loads(f_facts), json.loads(p_facts)
    assert f_facts.pop("numpy") != p_facts.pop("numpy")  # each seeded afresh, not the server's one state
    assert f_facts == p_facts and f_facts["session_leader"] and f_facts["name"] == "__main__"
    assert f_rest == p_rest
    assert forked[2].splitlines()[-1] == fresh[2].splitlines()[-1]
    assert forked[2].splitlines()[0] == fresh[2].splitlines()[0] == "to stderr"


def test_two_forks_draw_different_numbers_from_numpys_global_generator(tmp_path):
    """The server imported numpy.random once: without a fresh seed in each fork, every rank would draw the same
    'random' numbers, where ranks started by a launcher draw their own."""
    script = tmp_path / "draw.py"
    script.write_text("import numpy\nprint(numpy.random.random())\n")
    draws = {_run(forked_python.ForkedPython, script, "x", launch_env())[1] for _ in range(2)}
    assert len(draws) == 2


def test_an_environment_the_server_did_not_import_in_starts_a_subprocess(tmp_path):
    """Only the launcher's, pytest's, the compiler's run-time and this project's variables may differ from the
    server's: another (here one torch reads when it loads OpenMP) starts the script as python would. So does
    any script where torch is a GPU build."""
    script = tmp_path / "threads.py"
    script.write_text("import os\nprint(os.getppid(), os.environ['OMP_NUM_THREADS'])\n")
    env = {**launch_env(), "OMP_NUM_THREADS": "3"}
    assert not forked_python.forkable(env)
    assert forked_python.forkable({**launch_env(), "MASTER_PORT": "1", "RELORA_X": "1", "PYTEST_CURRENT_TEST": "t"})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start_python(script, [], env=env, cwd=ROOT, stdout=out, stderr=err)
        assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=120) == 0
        out.seek(0)
        assert out.read().split() == [str(os.getpid()), "3"]  # this process's child, not the server's
    with pytest.MonkeyPatch.context() as m:  # a GPU build of torch: every script starts as a subprocess
        m.setattr(torch.version, "cuda", "12.8")
        assert not forked_python.forkable(launch_env())
    with pytest.raises(AssertionError, match="differs from the server's"):
        forked_python.ForkedPython(script, [], env=env, cwd=ROOT, stdout=sys.stdout, stderr=sys.stderr)
