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
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # relora_ds/zero_reset.py relies on 0.19 internals (tested: 0.19.8)
        "triton>=3.0",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "transformers>=4.45",  # the exported tokenizer (relora_ds/hf_tokenizer.py)
        # Imported by name, not only through the packages above that depend on them today:
        "tokenizers",  # tokenizer.json files (relora_ds/data/tokenizer.py, data/prepare.py)
        "pyarrow",  # Parquet/Arrow inputs read and repaired (relora_ds/data/sources.py, data/encode.py)
        "huggingface_hub",  # a hub dataset's commit (relora_ds/data/inputs.py)
        "pydantic>=2",  # DeepSpeed's config fields, parsed as DeepSpeed parses them (relora_ds/ds_schema.py)
        "tqdm",
        "numpy",
        "pyyaml",
        "protobuf",  # sentencepiece's model proto (tokenizer inspection)
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
