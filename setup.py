"""relora_ds: ReLoRA pre-training on DeepSpeed ZeRO with Triton kernels.

The Triton kernels live in ``kernels/`` and install as ``relora_kernels`` (never as a top-level
``kernels`` module: transformers >= 5.25 requires and imports Hugging Face's own ``kernels`` package; where
the repository root is on sys.path, kernels/__init__.py hands that name over to it).
"""
from setuptools import find_packages, setup

setup(
    name="relora_ds",
    version="0.1.0",
    description="ReLoRA (high-rank training through low-rank updates) on DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["relora_ds", "relora_ds.*"]) + ["relora_kernels"],
    package_dir={"relora_kernels": "kernels"},
    install_requires=[
        # The set-up script installs torch first (a CPU wheel on CPU-only machines) so that this
        # range never pulls a multi-GB CUDA build by itself.
        # torch.distributed.tensor.distribute_tensor(src_data_rank=) (2.7: FSDP2 merges, relora_ds/sharded.py);
        # torch.distributed.fsdp.FSDPModule and torch.accelerator.current_device_index (2.6: relora_ds.wrap, the
        # batch readers); tests/test_version_floors_review.py holds the evidence for every floor below.
        "torch>=2.7",
        "deepspeed>=0.19.8,<0.20",  # relora_ds/zero_reset.py relies on 0.19 internals (tested: 0.19.8)
        # triton.set_allocator (kernels/matmul_tma.py; torch 2.7's CUDA wheels pin 3.3); its opt-in TMA_GEMM
        # kernel needs 3.4 (tl.make_tensor_descriptor) and says so on an older Triton
        "triton>=3.3",
        "datasets>=4.0",  # datasets.List (relora_ds/data/encode.py, at import)
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        # the exported tokenizer (relora_ds/hf_tokenizer.py); TrainingArguments.hub_revision (4.53) and
        # Trainer.processing_class (4.46) in relora_ds/hf_trainer.py
        "transformers>=4.53",
        # Imported by name, not only through the packages above that depend on them today:
        "tokenizers",  # tokenizer.json files (relora_ds/data/tokenizer.py, data/prepare.py)
        "pyarrow",  # Parquet/Arrow inputs read and repaired (relora_ds/data/sources.py, data/encode.py)
        "huggingface_hub",  # a hub dataset's commit (relora_ds/data/inputs.py)
        "pydantic>=2",  # DeepSpeed's config fields, parsed as DeepSpeed parses them (relora_ds/ds_schema.py)
        "tqdm",
        "numpy",
        "pyyaml",
        # sentencepiece's model proto (tokenizer inspection): sentencepiece 0.2.3's sentencepiece_model_pb2 is
        # protoc 7.36.1 code, which refuses an older protobuf runtime (VersionError)
        "protobuf>=7.36.1",
        "tensorboard",
        "matplotlib",  # launch/plot_metrics.py
    ],
    extras_require={
        # mpi: mpi4py for the MPI a cluster already has (module load openmpi/mpich first: mpi4py's wheel loads
        # it); mpich: with the mpich wheel, for a machine without MPI (its mpirun then comes first on PATH).
        "mpi": ["mpi4py>=4.0"],
        "mpich": ["mpi4py>=4.0", "mpich"],
        "flash": ["flash-attn>=2.5"],
        "wandb": ["wandb"],  # --wandb-project (relora_ds/metrics.py)
        "dev": ["pytest", "pytest-xdist", "peft>=0.13"],
    },
)
