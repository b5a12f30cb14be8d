import glob

import pytest

_SHM = "/dev/shm/deepspeed_allreduce_buffer_*"
_shm_before: set[str] = set()


def pytest_sessionstart(session):
    _shm_before.update(glob.glob(_SHM))


def pytest_sessionfinish(session, exitstatus):
    """Every multi-rank run must release DeepSpeed's 64 MB shared-memory segments (relora_ds.distributed
    .init_distributed does): one left by this session fails it, naming the files (their port names the run)."""
    left = sorted(set(glob.glob(_SHM)) - _shm_before)
    if left:
        print(f"\nFAILED: this session left DeepSpeed shared-memory segments behind: {left}")
        session.exitstatus = 1


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
# tests/test_trainer_resume.py (session-scoped: trained once for both).
@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, small_data_dir):
    from launch_utils import free_port
    from trainer_utils import read_losses, train2

    tmp, port = tmp_path_factory.mktemp("uninterrupted"), free_port()
    train2(tmp, small_data_dir, master_port=port, launcher=True)  # the README's command
    # DeepSpeed's CPU shm allreduce segments of this run (named after its MASTER_PORT) must all be gone.
    return {"losses": read_losses(tmp / "run"), "shm_left": sorted(glob.glob(f"/dev/shm/*allreduce_buffer_*_{port}_*"))}


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run["losses"]
