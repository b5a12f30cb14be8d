"""setup.py's minimum versions against the versions that introduced the APIs relora_ds/ and kernels/ call.

Each row of API_SINCE names an API, the release that first has it, the file that calls it (and a string of
that call, so that a row goes when its call does) and the evidence: the release's own files (its PyPI wheel,
unpacked, compared with the release before; the GitHub tag holds the same file), and an issue or pull request
where one says so. Only the installed versions were ever run; these rows are what an older release lacks.
"""
from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# (distribution, first version with the API, the API, file that uses it, text of that use)
API_SINCE = [
    # torch 2.7.0 wheel: torch/distributed/tensor/_api.py distribute_tensor(..., src_data_rank=0); 2.6.0's has no
    # src_data_rank (https://github.com/pytorch/pytorch/blob/v2.7.0/torch/distributed/tensor/_api.py)
    ("torch", "2.7", "distribute_tensor(src_data_rank=)", "relora_ds/sharded.py", "src_data_rank=None"),
    # torch 2.6.0 wheel: torch/distributed/fsdp/__init__.py exports FSDPModule (2.5.0: only
    # torch.distributed._composable.fsdp)
    # (https://github.com/pytorch/pytorch/blob/v2.6.0/torch/distributed/fsdp/__init__.py)
    ("torch", "2.6", "torch.distributed.fsdp.FSDPModule", "relora_ds/sharded.py",
     "from torch.distributed.fsdp import FSDPModule"),
    # torch 2.6.0 wheel: torch/accelerator/__init__.py (no torch/accelerator in 2.5.0); the *_index names:
    # https://github.com/pytorch/pytorch/pull/143186 ("Reland 2.6 ... {current,set}_device_{idx => index}")
    ("torch", "2.6", "torch.accelerator.current_device_index", "relora_ds/data/sampler.py",
     "torch.accelerator.current_device_index()"),
    # torch 2.5.0 wheel: torch/utils/checkpoint.py defines CheckpointPolicy, create_selective_checkpoint_contexts;
    # 2.4.0's does not (https://github.com/pytorch/pytorch/blob/v2.5.0/torch/utils/checkpoint.py)
    ("torch", "2.5", "torch.utils.checkpoint.create_selective_checkpoint_contexts", "relora_ds/checkpointing.py",
     "from torch.utils.checkpoint import create_selective_checkpoint_contexts"),
    # torch 2.5.0 wheel: torch/distributed/tensor/__init__.py exports DTensor (2.4.0: torch.distributed._tensor)
    ("torch", "2.5", "torch.distributed.tensor.DTensor", "relora_ds/sharded.py",
     "from torch.distributed.tensor import DTensor, distribute_tensor"),
    # torch 2.5.0 wheel: torch/_inductor/cpp_builder.py defines get_cpp_compiler; 2.4.0's does not (its absence
    # reads as "no C++ compiler works here" in relora_ds/compiling.py)
    ("torch", "2.5", "torch._inductor.cpp_builder.get_cpp_compiler", "relora_ds/compiling.py",
     "cpp_builder.get_cpp_compiler()"),
    # triton 3.3.0 wheel: triton/__init__.py exports set_allocator; 3.2.0's does not
    ("triton", "3.3", "triton.set_allocator", "kernels/matmul_tma.py", "triton.set_allocator("),
    # datasets 4.0.0 wheel: datasets/features/features.py defines class List; 3.6.0's does not
    # (https://github.com/huggingface/dataset-viewer/pull/3214: "datasets<4 ... doesn't have the List type")
    ("datasets", "4.0", "datasets.List", "relora_ds/data/encode.py", "datasets.List(datasets.Value("),
    # transformers 4.53.0 wheel: training_args.py has the field hub_revision; 4.52.1's does not
    # (https://github.com/huggingface/transformers/blob/v4.53.0/src/transformers/training_args.py)
    ("transformers", "4.53", "TrainingArguments.hub_revision", "relora_ds/hf_trainer.py", "trainer.args.hub_revision"),
    # transformers 4.46.0 wheel: trainer.py sets self.processing_class; 4.45.0's does not (it was `tokenizer`)
    ("transformers", "4.46", "Trainer.processing_class", "relora_ds/hf_trainer.py", "trainer.processing_class"),
    # sentencepiece 0.2.3 wheel: sentencepiece_model_pb2.py calls ValidateProtobufRuntimeVersion(PUBLIC, 7, 36, 1):
    # with protobuf 5.29.3 the import raised "VersionError: ... gencode 7.36.1 runtime 5.29.3. Same major version
    # is required" (run here); 0.2.0-0.2.2's generated code imports with protobuf 7.36
    ("protobuf", "7.36.1", "sentencepiece.sentencepiece_model_pb2 (0.2.3)", "relora_ds/hf_tokenizer.py",
     "from sentencepiece import sentencepiece_model_pb2"),
    # pydantic 2.0 wheel: pydantic/__init__.py exports TypeAdapter (new in 2.0)
    ("pydantic", "2.0", "pydantic.TypeAdapter", "relora_ds/ds_schema.py", "pydantic.TypeAdapter"),
]

# APIs of an opt-in path above the floor: the module refuses an older release, naming the version it needs.
# triton 3.4.0 wheel: triton/language/core.py defines make_tensor_descriptor; 3.3.0's does not
# (https://github.com/triton-lang/triton/blob/v3.4.0/python/triton/language/core.py)
GUARDED = [("triton", "3.4", "triton.language.make_tensor_descriptor", "kernels/matmul_tma.py",
            'hasattr(tl, "make_tensor_descriptor")')]


def _requirements() -> dict[str, Requirement]:
    """setup.py's install_requires and extras_require, by distribution name (read, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    specs = kw["install_requires"] + [r for extra in kw.get("extras_require", {}).values() for r in extra]
    return {Requirement(s).name.lower().replace("_", "-"): Requirement(s) for s in specs}


def _floor(req: Requirement) -> Version | None:
    """The lowest version `req` allows (its >= or == bound); None: no lower bound."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    bounds += [Version(s.version) for s in req.specifier if s.operator == ">"]  # strict: the floor is above it
    return max(bounds) if bounds else None


@pytest.mark.parametrize("dist", sorted({row[0] for row in API_SINCE}))
def test_floor_covers_every_api_the_code_calls(dist):
    req = _requirements().get(dist)
    assert req is not None, f"setup.py does not require {dist}, which relora_ds calls (API_SINCE)"
    need = max((Version(v), api) for d, v, api, _, _ in API_SINCE if d == dist)
    floor = _floor(req)
    assert floor is not None and floor >= need[0], (
        f"setup.py requires {req}, but {need[1]} is new in {dist} {need[0]}: raise the floor to >={need[0]}")


@pytest.mark.parametrize("row", API_SINCE, ids=[f"{r[0]}:{r[2]}" for r in API_SINCE])
def test_each_row_names_a_call_the_code_makes(row):
    """A row whose call the code no longer makes must go (and the floor may come down with it)."""
    dist, _, api, path, text = row
    assert text in (ROOT / path).read_text(), f"{path} no longer contains {text!r} ({dist}: {api}); update API_SINCE"


def test_installed_versions_meet_the_floors():
    """The tested environment satisfies every floor (a floor above it would be untested)."""
    low = []
    for name, req in _requirements().items():
        floor = _floor(req)
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed here (flash-attn, wandb)
        if floor is not None and Version(have.base_version) < floor:
            low.append(f"{name} {have} < {floor}")
    assert not low, f"installed below setup.py's floor: {low}"


@pytest.mark.parametrize("row", GUARDED, ids=[f"{r[0]}:{r[2]}" for r in GUARDED])
def test_an_api_above_the_floor_is_guarded(row, monkeypatch):
    """Above the floor, the path that needs it refuses an older release by name (matmul.TMA_GEMM on Triton 3.3:
    an AttributeError deep in a kernel's compilation otherwise)."""
    import importlib
    import sys

    import triton.language as tl

    dist, since, api, path, text = row
    floor = _floor(_requirements()[dist])
    assert floor is not None and floor < Version(since) and text in (ROOT / path).read_text()
    monkeypatch.delattr(tl, "make_tensor_descriptor")
    monkeypatch.delitem(sys.modules, "relora_kernels.matmul_tma", raising=False)
    with pytest.raises(ImportError, match=r"TMA_GEMM needs Triton >= 3\.4 \(tl\.make_tensor_descriptor\); this is "
                                          r"Triton .*: leave relora_kernels\.matmul\.TMA_GEMM False"):
        importlib.import_module("relora_kernels.matmul_tma")
    monkeypatch.delitem(sys.modules, "relora_kernels.matmul_tma", raising=False)  # re-imported whole next time
