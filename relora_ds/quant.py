"""8-bit frozen base weights for ReLoRA layers, and merges that do not drift.

Storage (``wrap(model, quantize="int8")``): each targeted layer's frozen W (out, in) becomes

- ``weight_q`` int8 (out, in), a frozen parameter (``requires_grad=False``), and ``weight_scale`` bf16 (out,),
  a buffer, both on the layer's device: per-output-channel absmax, ``W ≈ q · scale``. Device bytes:
  out·in + 2·out = (0.5 + 1/in)× bf16. ``weight_q`` is a parameter so that ZeRO-3 partitions it like a bf16
  base (1/N per rank, gathered per layer in forward and at a merge); frozen, it is in no optimizer group,
  and DeepSpeed's mixed-precision cast touches only float parameters (``CASTABLE_DTYPES``), so it stays
  int8. The scale is a buffer so that no precision setting recasts it (DeepSpeed casts buffers only when
  ``buffer_dtype`` is configured); it is 2 bytes per row, replicated.
- ``weight_residual`` int8 (out, in) in **host memory** (never moved by ``.to(device)``): the next 8 bits of
  the weight, ``W ≈ (q + residual/254) · scale`` (error at most half a residual step, scale/508 =
  absmax/64,516 ≈ 1.6e-5·absmax per element).

Merge without drift (``W_q ← quantize(dequantize(W_q) + s·B·A)``): requantizing the int8 weight alone
rounds at every merge and drifts (measured: 1.41× the one-shot error after 1 merge, 4.57× after 20).
We carry the rounding residual (error feedback), and the residual includes
the *initial* quantization error W0 − q(W0): the merge requantizes the 16-bit-accurate value
``(q + residual/254)·scale + s·B·A``, so after k merges the int8 weight is one absmax rounding of a value
within Σ scale_j/508 (plus fp32 rounding) of the exact fp32-accumulated weight, summed over the k + 1 roundings
of the residual (the initial one included) with the row's scale at each: at most (k+1)·max_j scale_j/508, not
(k+1)·scale/508 with the row's scale now (a row whose scale shrank keeps the larger steps' errors: 1.12× that
seen over 50 merges, tests/test_int8_review.py). Measured ratio to the one-shot error: 1.000–1.001 for
k = 1…20 (``merge_drift`` below; tests/test_int8_quant.py;
BENCHMARKS.md "int8 base weights"), 1.008 after 1000 independent merges, 1.7–4.0 after 1000 merges of one
update repeated, where the residual's roundings add up (launch/bench_merge_rounding.py).
Alternatives measured with the same function: stochastic rounding (unbiased, but error grows like √k),
an fp32 master in host memory (exact, 4 B/param of host memory instead of 1 B/param). The residual is a
buffer, so it is in every checkpoint (resume stays exact); it is computed identically on every rank (under
ZeRO-3 every rank merges the gathered weight, so every rank's residual follows).
"""
from __future__ import annotations

import relora_kernels
import torch
from torch import nn

VALID_QUANTIZE = (None, "int8")
HOST_BUFFERS = ("weight_residual",)
# Module/library prefixes whose Linear subclasses carry their own quantized weights.
_FOREIGN_QUANT = ("bitsandbytes", "torchao", "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "quanto", "hqq",
                  "transformers.integrations")


def check_quantize(quantize) -> str | None:
    """Validate a ``quantize`` setting; returns it."""
    if quantize not in VALID_QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not supported; valid values: "
                         f"{', '.join(repr(v) for v in VALID_QUANTIZE)}")
    return quantize


def _foreign_class(module: nn.Module) -> str | None:
    """Why ``module``'s class is a quantization library's layer (None when it comes from none of them)."""
    mod = type(module).__module__ or ""
    if any(mod == p or mod.startswith(p + ".") for p in _FOREIGN_QUANT):
        return f"its class {mod}.{type(module).__name__} is a quantized linear layer"
    return None


def foreign_quantization(linear: nn.Module) -> str | None:
    """Why ``linear`` looks already quantized by another library (None when it is a plain float linear)."""
    if type(linear) is not nn.Linear and (why := _foreign_class(linear)):
        return why
    w = getattr(linear, "weight", None)
    if w is None:
        return "it has no weight"
    if not w.is_floating_point():
        return f"its weight has dtype {w.dtype}"
    if type(w.data) is not torch.Tensor:
        return f"its weight is a {type(w.data).__name__} tensor subclass"
    for attr in ("quant_state", "SCB", "CB", "qweight"):
        if hasattr(w, attr) or hasattr(linear, attr):
            return f"it carries quantization state ({attr!r})"
    return None


def foreign_quantized_module(module: nn.Module) -> str | None:
    """Why a module that is not an ``nn.Linear`` (GPTQ's, AWQ's, HQQ's layers) is a quantized linear layer of
    another library; None when it does not look like one."""
    if why := _foreign_class(module):
        return why
    if hasattr(module, "qweight"):
        return f"{type(module).__name__} carries quantization state ('qweight')"
    return None


def already_quantized_error(names: str, reason: str, quantize: str | None) -> ValueError:
    ours = ("relora_ds quantizes from the float weight itself" if quantize else
            "ReLoRA trains low-rank factors over a float base, which it merges into")
    return ValueError(f"layer {names} is already quantized by another library ({reason}); {ours}. Load the model "
                      "in bf16/fp32 (without load_in_8bit/4bit or another quantization library)"
                      f"{' and pass' if quantize else '; for an 8-bit base pass'} quantize='int8'.")


def check_not_quantized(name: str, linear: nn.Module, quantize: str | None = "int8") -> None:
    reason = foreign_quantization(linear)
    if reason is not None:
        raise already_quantized_error(repr(name), reason, quantize)


# ----------------------------------------------------------------------------------------------- layer
def init_storage(layer: nn.Module, out_features: int, in_features: int, device=None) -> None:
    """Register the int8 storage on ``layer`` (its ``weight`` parameter must already be None)."""
    layer.weight_q = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                  requires_grad=False)
    layer.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))
    layer.register_buffer("weight_residual", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                         device=host_device(device)))


def host_device(device=None) -> torch.device:
    """Where a layer's host buffer (a merge residual) is made: the CPU, whatever the layer's device or the
    default device (``torch.device("cuda")`` as a context), except on meta, where nothing is held yet."""
    meta = (torch.device(device) if device is not None else torch.empty(0).device).type == "meta"
    return torch.device("meta" if meta else "cpu")


@torch.no_grad()
def quantized_base(layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight_q, weight_scale, weight_residual) of a float weight (out, in) for ``layer``'s int8 base (the
    residual keeps the initial error), on both ways a base arrives (load_base_, a state-dict load). A NaN or
    Inf would make its row's scale NaN and its int8 values meaningless: refused, counted."""
    if weight.device.type != "meta" and not (finite := torch.isfinite(weight)).all():
        raise ValueError(f"the int8 base of layer {layer.name or '<unnamed>'} got a weight with "
                         f"{int((~finite).sum())} non-finite values (NaN/Inf), which no per-row int8 scale can hold: "
                         "check the checkpoint it came from")
    return relora_kernels.int8_quantize_reference(weight, residual=True)


@torch.no_grad()
def load_weight_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Quantize a float weight (out, in) into the layer's buffers (:func:`quantized_base`)."""
    q, scale, residual = quantized_base(layer, weight.to(layer.weight_q.device))
    layer.weight_q.copy_(q)
    layer.weight_scale.copy_(scale)
    layer.weight_residual.copy_(residual)


def dequantized(layer: nn.Module, dtype: torch.dtype = torch.float32, q: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 weight the forward uses, as ``dtype`` (the residual is merge bookkeeping only); ``q``: the
    layer's weight_q (default), or the whole of it gathered from FSDP2's shards."""
    return relora_kernels.int8_dequantize_reference(layer.weight_q if q is None else q, layer.weight_scale, dtype)


@torch.no_grad()
def merge_(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """``(q, scale, residual) ← quantize(dequantize(q, scale, residual) + s·B·A)``: one Triton pass on CUDA
    (residual staged host→device→host), the fp32 torch twin elsewhere; deterministic, so identical on every
    data-parallel rank given identical A and B (the gathered fp32 masters). ``q``: the layer's weight_q
    (default), or the whole of it gathered from FSDP2's shards. A NaN or Inf in A or B would make rows' scales
    NaN or Inf for good (every later forward NaN), as at a load (:func:`quantized_base`): refused, counted, the
    base left as it was."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in (("lora_A", A), ("lora_B", B))}
    if any(bad.values()):
        raise ValueError(f"the merge into the int8 base of layer {layer.name or '<unnamed>'} got "
                         f"{' and '.join(f'{n} non-finite values (NaN/Inf) in {k}' for k, n in bad.items() if n)}, "
                         "which no per-row int8 scale can hold; the base is left as it was. The LoRA factors "
                         "diverged: resume from an earlier checkpoint (e.g. with a lower lr)")
    q = layer.weight_q if q is None else q
    relora_kernels.int8_merge_(q, layer.weight_scale, layer.weight_residual, A, B, layer.scale)


def device_bytes(out_features: int, in_features: int, quantize: str | None) -> int:
    """Device bytes of one frozen weight: bf16, or int8 + bf16 scales."""
    if quantize is None:
        return 2 * out_features * in_features
    return out_features * in_features + 2 * out_features


# ------------------------------------------------------------------------------------ drift measurement
MECHANISMS = ("naive", "residual", "stochastic", "host_fp32")


def _quantize_stochastic(w: torch.Tensor, g: torch.Generator):
    scale = relora_kernels.int8_quantize_reference(w)[1]
    v = w / scale.float()[:, None]
    q = torch.floor(v + torch.rand(v.shape, generator=g, dtype=v.dtype)).clamp_(-127, 127)
    return q.to(torch.int8), scale


@torch.no_grad()
def merge_drift(W0: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]],
                mechanisms=MECHANISMS, seed: int = 0) -> dict[str, list[float]]:
    """Relative error ‖W_k − W_exact_k‖/‖W_exact_k‖ after each merge k, per mechanism, plus ``one_shot``
    (quantizing W_exact_k once). W_exact accumulates W0 + Σ s·B·A in fp64; the int8 weight W_k is what the
    forward uses. ``updates``: (A (r, in), B (out, r), s) per merge."""
    ref = relora_kernels
    exact = W0.double().clone()
    err = {m: [] for m in ("one_shot", *mechanisms)}
    q0, s0, r0 = ref.int8_quantize_reference(W0, residual=True)
    state = {m: (q0.clone(), s0.clone(), r0.clone() if m == "residual" else None) for m in mechanisms}
    master = W0.float().clone()
    g = torch.Generator().manual_seed(seed)

    def rel(w):
        return ((w.double() - exact).norm() / exact.norm()).item()

    for A, B, s in updates:
        exact += s * (B.double() @ A.double())
        q1, s1, _ = ref.int8_quantize_reference(exact.float())
        err["one_shot"].append(rel(ref.int8_dequantize_reference(q1, s1)))
        for m in mechanisms:
            q, sc, res = state[m]
            if m in ("naive", "residual"):
                ref.int8_merge_reference_(q, sc, res, A, B, s)
            elif m == "stochastic":
                w = ref.int8_dequantize_reference(q, sc) + s * (B.float() @ A.float())
                q, sc = _quantize_stochastic(w, g)
                state[m] = (q, sc, None)
            else:  # host_fp32: an fp32 master in host memory, requantized after each merge
                master += s * (B.float() @ A.float())
                q, sc, _ = ref.int8_quantize_reference(master)
                state[m] = (q, sc, None)
            err[m].append(rel(ref.int8_dequantize_reference(q, sc)))
    return err


def realistic_updates(out_features: int, in_features: int, rank: int, merges: int, rel_norm: float = 0.02,
                      w_std: float = 0.02, alpha: float = 32.0, seed: int = 0):
    """W0 ~ N(0, w_std) (LLaMA init) and ``merges`` rank-r updates s·B·A with A Kaiming-uniform (our init) and
    B ~ N(0, σ) scaled so that ‖s·B·A‖_F = rel_norm·‖W0‖_F per merge (a trained ReLoRA cycle)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_features, in_features, generator=g) * w_std
    s = alpha / rank
    ups = []
    for _ in range(merges):
        bound = 1.0 / in_features ** 0.5
        A = (torch.rand(rank, in_features, generator=g) * 2 - 1) * bound
        B = torch.randn(out_features, rank, generator=g)
        B *= rel_norm * W0.norm() / (s * (B @ A).norm())
        ups.append((A, B, s))
    return W0, ups
