"""Path selection and launch helpers shared by the relora_kernels ops.

Nothing here touches a GPU driver at import time: the package must import on a CPU-only machine.

Environment variables (read at call time, never cached):

- ``RELORA_KERNELS=auto|triton|torch|reference`` (default ``auto``): ``auto`` runs the Triton kernels on
  CUDA tensors of a supported dtype, except for the ops in :data:`AUTO_TORCH_OPS`, and torch elsewhere;
  ``triton`` forces the kernels (on CPU tensors that means Triton's interpreter, so ``TRITON_INTERPRET=1``
  must be set); ``torch`` runs the LoRA linear as BLAS calls only (merged-weight GEMMs or an epilogue
  chain, kernels/torch_linear.py) and every other op as its twin; ``reference`` forces the pure-torch
  twins (the specification).
- ``RELORA_MERGED_WEIGHT=0|1``: the ``torch`` path's variant, never / always merged-weight (default: on CPU
  the one with fewer multiply-adds for each call's token count, torch_linear.use_merged_weight; on CUDA the
  epilogue chain).
- ``RELORA_DETERMINISTIC=1``: bitwise-reproducible backward (no atomics, fixed reduction order, one fixed
  launch configuration instead of autotuning). Also on when ``torch.use_deterministic_algorithms(True)``.
- ``TRITON_INTERPRET=1``: Triton's own switch for its CPU interpreter.
- ``RELORA_KERNELS_POISON=1`` (tests only): every buffer a launcher allocates with :func:`new_empty` is
  filled with NaN first, so an element a kernel forgets to write shows up as NaN.

How Triton reads ``TRITON_INTERPRET`` (checked in Triton 3.9 ``runtime/jit.py``; ``triton.knobs`` exists
since 3.4): ``@triton.jit`` consults ``triton.knobs.runtime.interpret`` -- which re-reads the environment on
every access -- *when the decorator runs*, i.e. when our kernel module is imported, and returns either a
compiled-kernel ``JITFunction`` or an ``InterpretedFunction``. So the mode is frozen per module import,
not per ``import triton`` -- except for triton.language.standard's own ``@jit`` helpers (``tl.cdiv``,
``tl.zeros``, ``tl.sum``...), decorated when triton itself is imported. :func:`for_current_mode`
removes the ordering constraint for our kernels: each launch re-wraps the kernel's Python function for the
mode in force at call time (cached); and our kernels call only core builtins, never those helpers. So
setting the variable in a test fixture is enough, whichever test imported triton or our kernels first.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

VALID_MODES = ("auto", "triton", "torch", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_flag(name: str) -> bool:
    """Our boolean environment switches: a value that is neither true nor false is an error, not off."""
    value = os.environ.get(name, "0").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(_TRUE)} or {', '.join(_FALSE[:-1])}")
    return value in _TRUE


def merged_weight_env() -> bool | None:
    """``RELORA_MERGED_WEIGHT``: True (always the merged-weight variant), False (never), None when unset."""
    value = os.environ.get("RELORA_MERGED_WEIGHT", "").strip().lower()
    if not value:
        return None
    if value not in _TRUE + _FALSE:
        raise ValueError(f"RELORA_MERGED_WEIGHT={value!r} is not valid; use one of {', '.join(_TRUE)} "
                         f"or {', '.join(_FALSE[:-1])}")
    return value in _TRUE


def check_environment() -> None:
    """Parse every switch the kernels read now, so that a bad value fails at start-up: each is otherwise read
    only by the call that needs it (RELORA_DETERMINISTIC by the Triton path, RELORA_MERGED_WEIGHT where the
    merged variant may run: a typo surfaced at the first evaluation, or never)."""
    kernel_mode()
    merged_weight_env()
    for name in ("RELORA_DETERMINISTIC", "RELORA_KERNELS_POISON"):
        _env_flag(name)


def kernel_mode() -> str:
    """The value of ``RELORA_KERNELS`` (``auto`` when unset)."""
    mode = os.environ.get("RELORA_KERNELS", "auto").strip().lower() or "auto"
    if mode not in VALID_MODES:
        raise ValueError(f"RELORA_KERNELS={mode!r} is not valid; use one of {', '.join(VALID_MODES)}")
    return mode


def interpret_env() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter, read as Triton reads it (1, true, yes,
    on, y, any case; unstripped: Triton reads " 1" as off), without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE + ("y",)


def eager_under_compile(fn):
    """``fn`` that torch.compile does not trace: it runs eagerly, a graph break around it (host-side moves a
    compiled graph cannot express: relora_ds/relora.py's FSDP2 host buffers). ``torch.compiler.disable``
    wraps it at its first call, not here: that decorator imports torch._dynamo (1.3-2.6 s of every process's
    start-up, measured on CPU), which nothing else at import needs. Under compile the first call then breaks
    the graph at the wrapping too, and runs ``fn`` eagerly all the same."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return call


def traced() -> bool:
    """Whether torch.compile is tracing or a Python dispatch mode is active (selective activation
    checkpointing's, relora_ds/checkpointing.py; FakeTensorMode; FlopCounterMode): then the Triton layer path
    launches through its registered torch ops (linear.FORWARD_OP, BACKWARD_OP), which such tracers see as one
    op each, and the BLAS path (torch_linear) writes no product's output after it is made. Otherwise both run
    as plain Python calls (a registered op's dispatch costs ~40 µs per layer per step, measured on CPU)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None  # this order: traceable


def _constant_under_compile(fn):
    """Marks ``fn`` as torch.compiler.assume_constant_result does (Dynamo calls it once while tracing and puts
    the result in the graph as a constant, no graph break) without that function's import of torch._dynamo
    (1.3-2.6 s by machine, BENCHMARKS.md "Rank start-up"; nothing else at import needs it). Nothing guards
    the constant: for facts fixed per process, or whose staleness costs no more than an error message
    (interpreting: see there)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # Triton's knobs read the environment through a C extension Dynamo cannot trace
def interpreting() -> bool:
    """Whether Triton would run kernels through its CPU interpreter right now. A compiled graph keeps the value
    it was traced with: traced code reads it only in check_device's CPU-tensor check (the launchers, inside
    the registered ops, read it at each launch), so a switch after the compile costs at most that check's
    clear error in favour of Triton's own."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton >= 3.4: honours both the env var and `knobs.runtime.interpret = True`
        return bool(knobs.runtime.interpret)
    return interpret_env()


_TRITON_INSTALLED: list[bool] = []  # memo (an lru_cache wrapper would hide the marker below from Dynamo)


@_constant_under_compile
def _triton_installed() -> bool:
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


# Ops that `auto` keeps on the torch path even on CUDA, because their Triton kernel measured slower.
# H100, bf16, 2026-11-22 (BENCHMARKS.md "Kernels"): a whole training step with the fused LoRA linear ran at
# 0.58x (350m) and 0.79x (1b) the tokens/s of the twin (cuBLAS), although the layer alone (its deterministic
# variant; the default fused one 1.00x) reached 0.86x of a full-rank linear at d=4096. H200, 2026-12-04: whole
# steps 0.57x / 0.95x, the best layer variant 0.749x at d=4096. RELORA_KERNELS=triton still forces the kernel.
AUTO_TORCH_OPS = frozenset({"linear"})


def use_triton(tensor: torch.Tensor, op: str | None = None) -> bool:
    """Whether ``op`` should take the Triton path for ``tensor`` (the layer input).

    ``auto``: Triton on CUDA tensors of dtype fp32/fp16/bf16, except for the ops in ``AUTO_TORCH_OPS``
    (those and every CPU tensor take the torch paths: linear_path).
    ``triton``: always Triton; raises if it cannot run (CPU tensors without the interpreter, a dtype the
    kernels do not handle, Triton not installed). ``reference`` and ``torch``: never.
    """
    mode = kernel_mode()
    if mode in ("reference", "torch"):
        return False
    if mode == "auto":
        return (op not in AUTO_TORCH_OPS and tensor.is_cuda and tensor.dtype in SUPPORTED_DTYPES
                and _triton_installed())
    # mode == "triton": fail loudly rather than silently fall back.
    if not _triton_installed():
        raise RuntimeError("RELORA_KERNELS=triton but triton is not installed")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"RELORA_KERNELS=triton: dtype {tensor.dtype} is not supported by the kernels; "
                         f"use one of {SUPPORTED_DTYPES} or RELORA_KERNELS=reference")
    check_device(tensor)
    return True


# The non-Triton path `auto` takes for the LoRA linear, per device type. CPU, 2026-11-30 (BENCHMARKS.md
# "The torch paths on CPU"): whole training steps 1.04-1.13x the twin's speed. CUDA, H200, bf16, 2026-12-04
# (BENCHMARKS.md "H200"): the layer's fwd+bwd at M=16384, r=128 1.16x (d=2048) and 1.11x (d=4096) the
# twin's speed, whole training steps 1.05x (350m) and 1.01x (1b); whole steps with the fused Triton layer
# 0.57x / 0.95x.
AUTO_LINEAR_TORCH_PATH = {"cpu": "torch", "cuda": "torch"}


def linear_path(tensor: torch.Tensor) -> str:
    """``"triton"``, ``"torch"`` (BLAS chain, kernels/torch_linear.py) or ``"reference"`` for the LoRA linear."""
    if use_triton(tensor, op="linear"):
        return "triton"
    return "torch" if torch_path(tensor) else "reference"


def torch_path(tensor: torch.Tensor) -> bool:
    """Whether a layer that does not run Triton takes the BLAS-only path rather than the twin."""
    mode = kernel_mode()
    return mode == "torch" or (mode == "auto" and AUTO_LINEAR_TORCH_PATH.get(tensor.device.type) == "torch")


def check_device(tensor: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``tensor``'s device."""
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "relora_kernels: Triton kernels on CPU tensors need Triton's interpreter; set "
                "TRITON_INTERPRET=1 in the environment (for Triton < 3.4: before triton is imported), "
                "or use RELORA_KERNELS=reference / RELORA_KERNELS=auto for the torch path")
        return
    raise ValueError(f"relora_kernels: no Triton path for device {tensor.device}; "
                     "use CUDA tensors or RELORA_KERNELS=reference")


INT32_MAX = 2**31 - 1  # the kernels' element offsets are 32-bit: Triton types integer arguments below 2**31 as i32


def span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to one past its last (its strides included)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def check_disjoint(op: str, written: str, w: torch.Tensor, **read: torch.Tensor | None) -> None:
    """An in-place op writing ``w`` reads no tensor that shares its memory: the twin computes the product before
    it writes, a kernel writes tile by tile while later tiles still read (``lora_merge_(W, A, W[:, :r])``
    differed by 9.3 from the twin). Byte ranges of one storage, strides included."""
    if w.numel() == 0:
        return
    start = w.data_ptr()
    end = start + span(w) * w.element_size()
    for name, t in read.items():
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
            continue
        if t.data_ptr() < end and start < t.data_ptr() + span(t) * t.element_size():
            raise ValueError(f"{op}: {name} shares memory with {written}, which the op writes; pass a copy "
                             f"({name}.clone())")


def check_writable(op: str, name: str, t: torch.Tensor) -> None:
    """As torch's in-place ops: an inference tensor is written only inside inference_mode (the twins' copy_
    refuses it; a kernel writing it anyway would accept on a GPU what the CPU refuses)."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{op}: {name} is an inference tensor (made under torch.inference_mode), which is written "
                         "in place only inside inference_mode; call it there, or pass a tensor made outside it")


def within_int32(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its strides reach past 32-bit offsets while its size does not (a
    narrowed view, e.g. the gradient torch.cat's backward hands on): the forward checked the size of dY,
    not the strides it would come with."""
    return t if span(t) <= INT32_MAX else t.contiguous()


def fits_int32(op: str, **spans: int) -> bool:
    """Whether every tensor a Triton launch of ``op`` addresses (``name=element span``) fits 32-bit offsets,
    past which they would wrap silently. When one does not: under ``RELORA_KERNELS=triton`` a ValueError;
    under ``auto`` a warning and False, and the caller takes the torch path (64-bit indexing)."""
    big = {name: n for name, n in spans.items() if n > INT32_MAX}
    if not big:
        return True
    what = ", ".join(f"{name} spans {n:,} elements" for name, n in big.items())
    msg = f"relora_kernels.{op}: {what}, past the Triton kernels' 32-bit offsets (at most {INT32_MAX:,})"
    if kernel_mode() == "triton":
        raise ValueError(f"{msg}; use a smaller micro-batch, or RELORA_KERNELS=auto/torch for the torch path")
    warnings.warn(f"{msg}: this call takes the torch path", RuntimeWarning, stacklevel=3)
    return False


def deterministic_mode(deterministic: bool | None = None) -> bool:
    """Explicit argument first, then ``RELORA_DETERMINISTIC``, then torch's global deterministic switch."""
    if deterministic is not None:
        return bool(deterministic)
    return _env_flag("RELORA_DETERMINISTIC") or torch.are_deterministic_algorithms_enabled()


def autocast_inputs(device_type: str, *tensors):
    """The tensors as autocast would hand them to ``F.linear`` on ``device_type``: when autocast is on, each
    floating tensor other than float64 is cast to the autocast dtype (float64 and None pass unchanged, so an
    all-float64 call stays float64 and a float64/float32 mix fails as in F.linear); otherwise all unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def check_owns_elements(op: str, name: str, t: torch.Tensor | None) -> None:
    """A kernel writes each element of ``t`` once: refuse storage where elements share memory (expand())."""
    if t is not None and t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{op}: {name} has elements that share memory (an expand()ed view?); pass a tensor that "
                         "owns each element")


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled under ``RELORA_KERNELS_POISON=1`` (tests)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _env_flag("RELORA_KERNELS_POISON"):
        out.fill_(float("nan"))
    return out


def layer_output(y: torch.Tensor, x_shape, out_features: int) -> torch.Tensor:
    """A Function's 2-D result ``y`` (M, out) in x's leading shape, as a tensor of its own, not a view: autograd
    refuses in-place ops on a view made inside a custom Function (Falcon's ``mlp_output += attention_output``
    on a wrapped layer's output failed), and F.linear's output takes them. ``_unsafe_view`` is what aten's
    matmul returns for the same reason: y is fresh, nothing else holds it."""
    return torch.ops.aten._unsafe_view(y, (*x_shape[:-1], out_features))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Plain Python: since Triton 3.5 ``triton.cdiv`` and
    ``triton.next_power_of_2`` are ``ConstexprFunction`` objects whose host-side call costs ~2 µs (Triton
    3.9, this repository's CPU), and one fused fwd+bwd made 26 such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as ``triton.next_power_of_2`` (which also gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def autotune_bucket(m: int) -> int:
    """The token count an autotuned GEMM is tuned for: ``m`` rounded up to a power of two. Tuning per exact
    ``m`` would benchmark every config again (~1 s per GEMM on Triton 3.6) for each new batch shape -- a last
    partial batch, evaluation, dynamic padding -- and grow the cache without bound."""
    return next_power_of_2(m)


class AutotuneKeyWarning(RuntimeWarning):
    """The autotuner holds no config under the key a launcher computed for it (a Triton whose autotune key
    is built differently): its last choice is used instead. tests/test_kernels_compile.py makes this an error."""


def chosen_config(tuner, triton_key: tuple):
    """The config ``tuner`` chose for ``triton_key``, written as its Autotuner.run writes its cache keys (the
    `key` names' values, then ``str(dtype)`` of every tensor argument; Triton 3.6 to 3.9)."""
    config = tuner.cache.get(triton_key)
    if config is None:
        warnings.warn(f"relora_kernels: triton's autotuner holds no config under {triton_key} (its key format "
                      "changed?); using its last choice", AutotuneKeyWarning, stacklevel=3)
        config = tuner.best_config
    return config


_FITTED_STAGES: dict = {}  # (kernel, config, dtype, device) -> the num_stages that fit the device


def launch_fixed(kernel, grid, args, kwargs: dict, cfg: dict, dtype, device) -> None:
    """Launch ``kernel[grid](*args, **kwargs, **cfg)`` with a fixed (untuned) GPU config, dropping pipeline
    stages while it overflows the device's shared memory. The fixed configs are sized for Hopper (227 KB);
    an A100 (163 KB) or a smaller part raises ``OutOfResources`` at the first launch, before anything runs,
    and how much a config needs moves between Triton versions (_ds_db_kernel fp32: 160 KB on 3.9, 224 KB on
    3.6), so it is asked of the compiler rather than estimated. What fitted is remembered per process."""
    from triton.runtime.errors import OutOfResources

    key = (kernel.fn if hasattr(kernel, "fn") else kernel, tuple(sorted(cfg.items())), dtype, device)
    stages = _FITTED_STAGES.get(key, cfg["num_stages"])
    while True:
        try:
            kernel[grid](*args, **kwargs, **{**cfg, "num_stages": stages})
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _FITTED_STAGES[key] = stages
        return


_WRAPPED: dict = {}


def for_current_mode(kernel):
    """Return ``kernel`` (a ``@triton.jit`` object) compiled or interpreted per the mode in force now."""
    wants_interp = interpreting()
    is_interp = type(kernel).__name__ == "InterpretedFunction"
    if wants_interp == is_interp:
        return kernel
    key = (kernel.fn, wants_interp)
    if key not in _WRAPPED:
        if wants_interp:
            from triton.runtime.interpreter import InterpretedFunction
            _WRAPPED[key] = InterpretedFunction(kernel.fn)
        else:
            import triton
            _WRAPPED[key] = triton.jit(kernel.fn)
    return _WRAPPED[key]


def upcast_for_interpreter(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 ``tl.dot`` returns garbage (Triton issue #11584): dot in fp32 there."""
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands use 3xTF32 (error ~1e-6 instead of plain TF32's ~4e-4;
    fp32 is the accuracy path, bf16 the speed path); 16-bit operands ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


HOPPER_SHARED_MEMORY = 232448  # bytes per block, opt-in (H100/H200: 227 KB)


@functools.lru_cache(maxsize=None)
def shared_memory_limit() -> int:
    """Opt-in shared memory per block of the current CUDA device (Hopper's when torch cannot say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SHARED_MEMORY


def pipeline_fits(block_m: int, block_n: int, block_k: int, stages: int, in_bytes: int, epilogue_bytes: int = 0) -> bool:
    """Whether a GEMM config's software pipeline (``stages`` A and B tiles) plus an epilogue buffer of
    ``epilogue_bytes`` per output element fit in shared memory. Agrees with what Triton 3.6 compiled for
    sm_90 (pointer kernel, TMA kernel with its store buffer): Triton would find an overflow only after a
    full compile per config (0.7-4 s each) and then raise ``OutOfResources`` if no config fits."""
    need = stages * (block_m + block_n) * block_k * in_bytes + block_m * block_n * epilogue_bytes
    return need <= shared_memory_limit()


def target_programs(device: torch.device) -> int:
    """How many programs a reduction-over-tokens launch should aim for (about two waves of SMs)."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter: small, but > 1 so that tests exercise the split path

