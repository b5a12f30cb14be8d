import glob
import os

import pytest

_SHM = "/dev/shm/deepspeed_allreduce_buffer_*"
_shm_before: set[str] = set()

# scripts/test.sh runs the suite on pytest-xdist workers, a whole test file per worker (--dist loadfile: a file's
# module fixtures are built once). Files are handed out in collection order, so the longest go first (by
# `pytest --durations=0` on 2 cores, 2026-12-07, ranks forked: tests/forked_python.py; test_kernels_compile.py
# also installs the GPU image's Triton on a fresh machine); one started last would run alone at the end, so
# every file over ~10 s is named here.
_HEAVY_FIRST = ("test_cluster_slurm.py", "test_compile.py", "test_trainer_resume_layouts.py",
                "test_kernels_compile.py", "test_nvme_offload.py", "test_memory_table.py", "test_trainer.py",
                "test_trainer_resume.py", "test_kernel_scripts.py", "test_kernels.py", "test_distributed.py",
                "test_demo.py", "test_hf_trainer.py", "test_checkpointing.py", "test_zero_init.py",
                "test_zero_reset.py", "test_kernel_ops.py", "test_startup_imports.py", "test_trainer_steps.py",
                "test_model_families_trainer.py", "test_bench_comm.py", "test_memory_runs.py", "test_int8_trainer.py",
                "test_fsdp.py", "test_data_inputs.py", "test_warm_start_from.py", "test_cluster_mpi.py",
                "test_kernel_dispatch.py", "test_checkpoint_agree.py", "test_zero_reset_fuzz_cases.py",
                "test_resume_fuzz_cases.py", "test_fsdp_review.py", "test_hf_trainer_review.py",
                "test_universal_review.py", "test_checkpointing_review.py", "test_warm_start_review.py",
                "test_precision_review.py", "test_loss_review.py", "test_optimizer_review.py", "test_flops_review.py",
                "test_stage0_review.py", "test_ckpt16_review.py", "test_packaging_review.py", "test_paths_review.py",
                "test_diff_review3.py", "test_hf_fsdp_review.py", "test_diff_review4.py", "test_perms_review.py")


def pytest_collection_modifyitems(config, items):
    gone = [name for name in _HEAVY_FIRST if not os.path.isfile(os.path.join(os.path.dirname(__file__), name))]
    if gone:  # a renamed file would drop out of the order unseen
        raise pytest.UsageError(f"tests/conftest.py _HEAVY_FIRST names files that do not exist: {gone}")
    order = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


def pytest_configure(config):
    """DeepSpeed's op cache and compiler as scripts/setup_env.sh sets them (also for a pytest started without
    it): ninja rebuilds an op whose build command changed, so every process must agree on CXX.

    On an xdist worker, torch and OpenMP get the worker's share of the cores: with torch's default (every
    core) in each of 2 workers on 2 cores, OpenMP's spinning threads made in-process tests ~10x slower
    (tests/test_readme.py 5 s -> 53 s). Subprocesses inherit OMP_NUM_THREADS."""
    import sys
    from pathlib import Path

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    os.environ.setdefault("CXX", str(Path(__file__).resolve().parents[1] / "scripts" / "cxx_no_debug.sh"))
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _xdist_worker(session) -> bool:
    return hasattr(session.config, "workerinput")  # pytest-xdist: the controller checks, after every worker


# Set by the outermost pytest session; a pytest a test starts (launch/gpu_tests.sh --collect-only, ...)
# inherits it and is nested.
_OUTER = "RELORA_TESTS_OUTER_SESSION"
_nested = False


def pytest_sessionstart(session):
    global _nested
    _nested = _OUTER in os.environ
    os.environ.setdefault(_OUTER, str(os.getpid()))
    if not _xdist_worker(session) and not _nested:
        _shm_before.update(glob.glob(_SHM))


def pytest_sessionfinish(session, exitstatus):
    """Every multi-rank run must release DeepSpeed's 64 MB shared-memory segments (relora_ds.distributed
    .init_distributed does): one left by this session fails it, naming the files (their port names the run).
    Checked by the outermost session only: a nested pytest (one a test starts) would also see the segments
    of multi-rank tests running meanwhile in another xdist worker, and fail on them (seen once in CI,
    2026-12-04: launch/gpu_tests.sh --collect-only exited 1)."""
    if _xdist_worker(session) or _nested:
        return
    left = sorted(set(glob.glob(_SHM)) - _shm_before)
    if left:
        print(f"\nFAILED: this session left DeepSpeed shared-memory segments behind: {left}")
        session.exitstatus = 1


# What a launcher gives each rank: left in os.environ by a test (launch/train.py's main() run in-process, whose
# process group start sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR), they made a later test in the same xdist
# worker take itself for a rank of a distributed job: the HF Trainer wrapped DDP (CI, 2026-12-06).
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
                  "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_launcher_environment():
    """Fails the test that leaves a launcher's variable changed, or a torch.distributed process group started,
    after its own fixtures (monkeypatch) have undone theirs; restores the variables and ends the group first,
    so the tests after it run as they would alone."""
    import sys

    before = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    dist = sys.modules.get("torch.distributed")
    group_before = dist is not None and dist.is_available() and dist.is_initialized()
    yield
    leaked = {k: os.environ.get(k) for k in _LAUNCHER_VARS if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    dist = sys.modules.get("torch.distributed")
    group_left = not group_before and dist is not None and dist.is_available() and dist.is_initialized()
    if group_left:
        dist.destroy_process_group()
    left = [f"the launcher variables {leaked}"] * bool(leaked) + ["a torch.distributed process group"] * group_left
    if left:
        pytest.fail(f"this test left {' and '.join(left)} behind in this pytest process: later tests here would "
                    "run as ranks of a job. Undo it in the test (monkeypatch.setenv; save and restore os.environ "
                    "around an in-process main(); destroy_process_group)", pytrace=False)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """The built-in corpus, first 1500 documents, 512-token SentencePiece vocab (prepared once per session)."""
    from relora_ds.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "builtin-512"
    prepare_data(None, out, vocab_size=512, max_docs=1500)
    return out


@pytest.fixture
def kernels_on(monkeypatch, request):
    """Force the Triton path for one test: interpreter on CPU, compiled on CUDA; poison new buffers."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device", "cpu") if callspec else "cpu"
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("RELORA_KERNELS_POISON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if device == "cpu" else "0")
    monkeypatch.delenv("RELORA_DETERMINISTIC", raising=False)
    return device


# One uninterrupted 2-rank run of trainer_utils.RECIPE, the reference of tests/test_trainer.py and
# tests/test_trainer_resume*.py (session-scoped: trained once per worker).
@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, small_data_dir):
    from launch_utils import free_port
    from trainer_utils import read_losses, train2

    tmp, port = tmp_path_factory.mktemp("uninterrupted"), free_port()
    proc = train2(tmp, small_data_dir, master_port=port, launcher=True)  # the README's command
    # DeepSpeed's CPU shm allreduce segments of this run (named after its MASTER_PORT) must all be gone.
    return {"losses": read_losses(tmp / "run"), "run_dir": tmp / "run", "shm_left": sorted(glob.glob(f"/dev/shm/*allreduce_buffer_*_{port}_*")),
            "stderr": proc.stderr}


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run["losses"]
