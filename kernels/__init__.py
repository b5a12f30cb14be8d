"""relora_kernels: fused Triton kernels for ReLoRA's low-rank linear layer and merge.

Public API (each op has a pure-torch twin that is its specification: the path of merges and dequantization
wherever Triton does not run, and of the layer under ``RELORA_KERNELS=reference``; ``auto`` runs the layer on
the BLAS path below instead, on CPU and on CUDA):

- ``lora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True, generator=None,
  *, deterministic=None)`` -- autograd-aware, dispatches itself; twin ``lora_linear_reference``.
- ``lora_merge_(weight, lora_A, lora_B, scale)`` -- in-place ``W += scale * B @ A``; twin
  ``lora_merge_reference_``.
- ``lora_linear_torch(...)`` -- the same layer as BLAS calls only: GEMMs on the merged weight ``W + s·B·A``
  or an epilogue chain (module ``torch_linear``; ``RELORA_KERNELS=torch``, and ``auto`` on CPU and, epilogue
  chain only, on CUDA).
- ``use_triton(tensor, op=None) -> bool`` -- whether ``op`` runs Triton for ``tensor`` (env
  ``RELORA_KERNELS=auto|triton|torch|reference``; the layer asks with ``op="linear"``, which ``auto`` keeps on
  the BLAS path: ``AUTO_TORCH_OPS``).
- ``deterministic_mode(deterministic=None) -> bool`` -- the argument, else env ``RELORA_DETERMINISTIC=1``, else
  torch's deterministic switch.
- int8 frozen base (``int8``): ``int8_lora_linear(x, q, w_scale, lora_A, lora_B, scale, ...)``,
  ``int8_dequantize(q, scale, dtype=float32, residual=None)``,
  ``int8_merge_(q, scale, residual, lora_A, lora_B, s)`` (returns the three tensors it updates); twins
  ``int8_lora_linear_reference``, ``int8_dequantize_reference``, ``int8_merge_reference_`` and the quantizer
  ``int8_quantize_reference`` (module ``int8_reference``).

Traced (torch.compile, a Python dispatch mode such as selective activation checkpointing's or FakeTensorMode), the
Triton layer path launches through two registered torch ops, ``relora_kernels::lora_linear_forward`` and
``relora_kernels::lora_linear_backward`` (module ``linear``: ``FORWARD_OP``, ``BACKWARD_OP``), registered when that
module is first used.

Importing this package imports neither triton nor any GPU driver: the kernel modules load on first use
(PEP 562 ``__getattr__``), so the package imports on CPU-only machines and costs nothing until used.
Module names (``linear``, ``merge``, ``matmul``, ``torch_linear``) differ from the function names on purpose: importing a
submodule binds its name on the package, which would shadow a same-named function.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys


def _huggingface_kernels() -> bool:
    """This folder imported as ``kernels`` (the repository root on sys.path: ``python -m pytest`` or
    ``python -c`` run there) would shadow Hugging Face's ``kernels`` package, which transformers >= 5.25
    requires and imports: put that package in its place where it is installed (True); else this folder stays
    ``kernels``, as before (False). Nothing of relora_kernels is then imported under that name."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None or os.path.realpath(spec.origin or "") == os.path.realpath(__file__):
        return False
    this = sys.modules["kernels"]
    module = sys.modules["kernels"] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["kernels"] = this
        raise
    return True  # the import statement returns sys.modules["kernels"]: Hugging Face's


if __name__ == "kernels" and _huggingface_kernels():
    pass
else:
    from ._runtime import (autocast_inputs, check_environment, deterministic_mode, eager_under_compile,
                           interpret_env, interpreting, kernel_mode, use_triton)
    from .int8_reference import (int8_dequantize_reference, int8_lora_linear_reference, int8_merge_reference_,
                                 int8_quantize_reference)
    from .reference import lora_linear_reference, lora_merge_reference_

_LAZY = {
    "lora_linear": "linear",
    "LoRALinearFunction": "linear",
    "lora_forward": "linear",
    "lora_backward": "linear",
    "lora_merge_": "merge",
    "lora_linear_torch": "torch_linear",
    "merge_launch": "merge",
    "concat_matmul": "matmul",
    "int8_lora_linear": "int8",
    "int8_dequantize": "int8",
    "int8_merge_": "int8",
    "Int8LoRALinearFunction": "int8",
}

__all__ = ["lora_linear", "lora_linear_reference", "lora_linear_torch", "lora_merge_", "lora_merge_reference_", "use_triton",
           "autocast_inputs", "check_environment", "deterministic_mode", "eager_under_compile", "interpret_env", "interpreting", "kernel_mode", "LoRALinearFunction", "lora_forward",
           "lora_backward", "merge_launch", "concat_matmul", "int8_lora_linear", "int8_dequantize", "int8_merge_",
           "Int8LoRALinearFunction", "int8_lora_linear_reference", "int8_dequantize_reference",
           "int8_merge_reference_", "int8_quantize_reference"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
