"""What every rank imports at start-up: each second here is paid by every process of every run (and by
every 2-rank test). The oracle is sys.modules of a fresh interpreter."""
import subprocess
import sys
import textwrap

from launch_utils import ROOT, free_port, launch_env


# py-cpuinfo queries a script makes, counted in ``asked`` (each is a subprocess of cpuinfo.py).
COUNT_CPUINFO_QUERIES = """
        import subprocess
        asked = []

        class Counting(subprocess.Popen):
            def __init__(self, args, *a, **kw):
                asked.extend(["cpuinfo"] if any("cpuinfo" in str(x) for x in args) else [])
                super().__init__(args, *a, **kw)
        subprocess.Popen = Counting
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_trainer_imports_no_data_preparation():
    """Hugging Face datasets (with pandas and pyarrow) is for preparing data; a training rank reads prepared
    files. relora_ds.data still hands out prepare_data and in_validation, on first use."""
    out = _run("""
        import sys
        import relora_ds.trainer
        before = sorted(m for m in ("datasets", "pandas") if m in sys.modules)
        from relora_ds.data import PrepareConfig, in_validation, prepare_data
        print(before, "datasets" in sys.modules, prepare_data.__module__, in_validation.__module__)
    """)
    assert out == "[] True relora_ds.data.prepare relora_ds.data.encode"


def test_deepspeeds_muon_module_compiles_on_first_call_not_at_import():
    """DeepSpeed's ZeRO code imports its Muon optimizer on every rank, and that module's torch.compile
    decorations imported torch's compiler (relora_ds/ds_patches.py, item 5). Imported through the patch, the
    compiler stays unloaded, torch.compile is torch's own again afterwards (a mutation trial's survivor left
    the lazy stand-in in its place for the whole process), and a decorated function is compiled once, at its first call, from the
    original function: its results are the undecorated function's."""
    out = _run("""
        import sys, torch
        from relora_ds.ds_patches import import_muon_compiling_on_first_call
        real = torch.compile
        import_muon_compiling_on_first_call()
        import_muon_compiling_on_first_call()  # idempotent
        from deepspeed.runtime.zero.muon import original_muon as m
        loaded = "torch._inductor.compile_fx" in sys.modules or torch.compile is not real  # torch's own again
        compiled = []
        torch.compile = lambda fn, **kw: compiled.append(fn) or fn  # stands in for the compiler
        g = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        first, second = m.zeropower_via_newtonschulz5(g, 5), m.zeropower_via_newtonschulz5(g, 5)
        plain = m.zeropower_via_newtonschulz5.__wrapped__
        print(loaded, len(compiled), compiled[0] is plain, torch.equal(first, plain(g, 5)), torch.equal(second, first))
    """)
    assert out == "False 1 True True True"


def test_a_rank_asks_py_cpuinfo_once_and_every_caller_gets_its_answer():
    """py-cpuinfo starts a Python subprocess per query (~0.9 s of CPU); DeepSpeed asked 4 times on each rank of
    a run with the optimizer offloaded (relora_ds/ds_patches.py, item 7). After the rank's init_distributed:
    two DeepSpeedCPUAdams and the op's first load, one query in all; each caller gets py-cpuinfo's own answer
    (the oracle: its query before the patch) as a dict of its own, and a failed query ({}) is not kept."""
    out = _run(COUNT_CPUINFO_QUERIES + """
        import os, torch
        import cpuinfo
        truth = cpuinfo.get_cpu_info()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="THE_PORT")
        from relora_ds.distributed import init_distributed
        init_distributed(dist_backend="gloo")
        real_json = cpuinfo.cpuinfo.get_cpu_info_json
        cpuinfo.cpuinfo.get_cpu_info_json = lambda: "{}"  # this query fails, as py-cpuinfo reports it
        failed = cpuinfo.get_cpu_info()
        cpuinfo.cpuinfo.get_cpu_info_json = real_json
        before = len(asked)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        w = torch.nn.Parameter(torch.ones(4))
        DeepSpeedCPUAdam([w]), DeepSpeedCPUAdam([w])
        mine = cpuinfo.get_cpu_info()
        mine["flags"].clear()
        print(failed, before, len(asked), cpuinfo.get_cpu_info() == truth, bool(truth.get("flags")))
    """.replace("THE_PORT", str(free_port())))
    assert out == "{} 1 2 True True"


def test_a_deepspeed_trainer_made_a_relora_run_asks_py_cpuinfo_once(tmp_path):
    """A Hugging Face Trainer's ranks start through accelerate, not relora_ds.distributed.init_distributed:
    enable_relora installs the same memo on a DeepSpeed Trainer (relora_ds/ds_patches.py, item 7). After it, two
    DeepSpeedCPUAdams and the op's first load make one py-cpuinfo query in all (counted subprocesses)."""
    out = _run(COUNT_CPUINFO_QUERIES + """
        import os, sys, torch
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="THE_PORT")
        sys.path.insert(0, "tests/dist")
        import hf_trainer_worker as w
        from transformers import TrainingArguments
        from relora_ds.hf_trainer import enable_relora
        ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
        args = TrainingArguments(output_dir="OUT", use_cpu=True, report_to=[], max_steps=2, deepspeed=ds)
        trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
        enable_relora(trainer, cycle_length=1, restart_warmup_steps=0)
        before = len(asked)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        p = torch.nn.Parameter(torch.ones(4))
        DeepSpeedCPUAdam([p]), DeepSpeedCPUAdam([p])
        print(trainer.is_deepspeed_enabled, len(asked) - before)
    """.replace("THE_PORT", str(free_port())).replace("OUT", str(tmp_path)))
    assert out == "True 1"


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels_package(tmp_path):
    """From the repository root (on sys.path for `python -m pytest` and `python -c`), `import kernels` found
    this project's kernels/ folder: transformers >= 5.25 requires Hugging Face's `kernels` package and imports
    it, and every `import transformers` there failed (CI, 2026-12-03). The folder hands the name over to the
    installed package (here a stand-in on PYTHONPATH); relora_kernels is unaffected."""
    import os

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUGGING_FACE = True\n")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import kernels, relora_kernels
        print(sys.path[0] in ("", "."), getattr(kernels, "HUGGING_FACE", False),
              relora_kernels.lora_linear_reference.__module__)
    """)], cwd=ROOT, env={**launch_env(), "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "relora_kernels.reference"]
    assert os.path.isdir(ROOT / "kernels")  # the folder the issue names, still there


def test_the_trainer_does_not_import_torchs_compiler_stack():
    """torch._dynamo takes ~3 s to import (measured on CPU): the layers' torch.compiler.disable wrapper (the FSDP2
    host-buffer move) is made at its first call, and registering the Triton path's ops (relora_kernels.linear)
    needs none of it, so a run without --compile never loads it."""
    out = _run("""
        import sys
        import relora_ds, relora_ds.trainer, relora_ds.evaluate, relora_kernels
        from relora_kernels import linear, int8
        print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
    """)
    assert out == "[]"
