"""The ReLoRA layer and the conversion that puts it into a model (ours or a Hugging Face one).

ReLoRA is a conversion applied to a built model (torchtitan's ModelConverter pattern): `wrap(model)`
replaces every targeted linear layer (which ones: targets.py) by a `ReLoRALinear` in place; the model code
knows nothing of it. Embeddings, norms and lm_head stay trainable full-rank (paper §3).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from collections.abc import Iterable, Iterator

import relora_kernels
import torch
from torch import nn

from . import quant, sharded, targets
from .merge_stats import update_norms

# The reference implementation trains r=128 with lora_alpha=32 (scale 0.25); we keep its alpha.
DEFAULT_ALPHA = 32.0


def _hashed_seed(*parts) -> int:
    """A 63-bit seed: sha256 of the parts joined by "/", its first 8 bytes little-endian."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def reinit_seed(run_seed: int, layer_name: str, restart_index: int) -> int:
    """A 63-bit seed from (run seed, layer name, restart index): every data-parallel rank derives the same
    lora_A without communication, and a resumed run redraws exactly what an uninterrupted one would."""
    return _hashed_seed(run_seed, layer_name, restart_index)


def dropout_seed(run_seed: int, step: int, rank: int) -> int:
    """A 63-bit seed of the LoRA dropout stream of ``rank`` from ``step`` on: hashed, so that it is neither the
    init's stream (``run_seed``) nor another rank's or another run seed's."""
    return _hashed_seed(run_seed, "dropout", step, rank)


def is_deepspeed_engine(obj) -> bool:
    """A DeepSpeed engine (``DeepSpeedEngine`` or a subclass: the pipeline and hybrid engines), told apart
    without importing DeepSpeed."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__) or hasattr(obj, "zero_optimization_stage")


def kaiming_uniform_A(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Kaiming-uniform(a=√5) in fp32 on the CPU from a seeded generator (bound 1/√in_features, the same
    init as nn.Linear and PEFT's lora_A); CPU so that every device type draws identical numbers."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(shape, dtype=torch.float32, device="cpu")  # also under another default device
    return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for merges: fp32, or fp64 for fp64 weights (never lower than the weight)."""
    return torch.promote_types(dtype, torch.float32)


def check_layer_args(name: str, in_features: int, out_features: int, rank, alpha, dropout) -> None:
    """The checks of one layer's LoRA settings; `wrap` runs them on every target before it swaps any in."""
    where = f"layer {name or '<unnamed>'}"
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{where}: rank={rank!r} must be an integer (got {type(rank).__name__})")
    if not 0 < rank <= min(in_features, out_features):
        raise ValueError(f"{where}: rank={rank} must be in [1, min(in_features={in_features}, "
                         f"out_features={out_features})]")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"{where}: alpha={alpha!r} must be a positive finite number (scale = alpha / rank; "
                         f"default {DEFAULT_ALPHA:g})")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout={dropout!r} must be in [0, 1)")


class ReLoRALinear(nn.Module):
    """``y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` with W frozen; a bias trains full-rank, like the norms
    (as in the reference code; ``wrap`` keeps the replaced layer's setting).

    Shapes and names as PEFT's LoRA: ``weight`` (out, in), ``lora_A`` (rank, in), ``lora_B`` (out, rank),
    ``scale = alpha / rank``. With ``quantize="int8"`` there is no ``weight`` parameter: the base lives in
    int8 (frozen parameter ``weight_q``; buffers ``weight_scale`` and host ``weight_residual``; see
    relora_ds/quant.py). lora_A starts Kaiming-uniform and lora_B at zero, so a fresh layer computes
    exactly the base layer while B still receives a gradient at the first backward (the reference code
    zeroed both, which leaves LoRA without gradient until the first restart). ``init_base=False`` leaves the
    base weight (and bias) for the caller to load, as ``wrap`` does.
    """

    HOST_BUFFERS = (*quant.HOST_BUFFERS, "merge_residual")  # kept in host memory, never moved to the device
    # The layer `wrap` replaced, which `unwrap` puts back: nn.Linear, or transformers' Conv1D (weight (in, out)).
    base_type: type = nn.Linear

    def __init__(self, in_features: int, out_features: int, rank: int, *, alpha: float | None = None,
                 dropout: float = 0.0, bias: bool = False, name: str = "", seed: int = 0,
                 quantize: str | None = None, merge_residual: bool = False, device=None, dtype=None,
                 init_base: bool = True):
        super().__init__()
        check_layer_args(name, in_features, out_features, rank, alpha, dropout)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(DEFAULT_ALPHA if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dropout = dropout
        self.name, self.seed = name, seed
        self.quantize = quant.check_quantize(quantize)
        kw = dict(device=device, dtype=dtype)
        w0 = torch.empty(out_features, in_features, **kw)
        if self.quantize:
            self.register_parameter("weight", None)
            quant.init_storage(self, out_features, in_features, device)
        else:
            self.weight = nn.Parameter(w0, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        # How many merges this layer has seen: part of the re-init seed, saved with the model so that a
        # resumed run redraws the same A.
        self.register_buffer("merge_count", torch.zeros((), dtype=torch.int64))
        if merge_residual:
            if self.quantize:
                raise ValueError(f"layer {name or '<unnamed>'}: merge_residual is for float bases; an int8 base "
                                 "carries its own error-feedback residual (relora_ds/quant.py)")
            # What the last merge's rounding into a bf16/fp16 weight dropped, added back at the next merge
            # (error feedback), in bf16 in host memory: 2 bytes per base parameter, never on the GPU.
            self.register_buffer("merge_residual", torch.zeros(out_features, in_features, dtype=torch.bfloat16,
                                                               device=quant.host_device(device)))
        else:
            self.merge_residual = None
        if init_base:  # a standalone layer starts like nn.Linear (weight and bias) ...
            nn.init.kaiming_uniform_(w0, a=math.sqrt(5))
            if self.bias is not None:
                with torch.no_grad():
                    bound = 1.0 / math.sqrt(in_features)
                    self.bias.uniform_(-bound, bound)
            if self.quantize:
                quant.load_weight_(self, w0)
        # ... where wrap() (init_base=False) loads the model's: no throw-away draw over every base weight
        # (about a minute of one core's time at 7b, repeated at the warm-start switch and the export), and
        # the global RNG is left as it was. lora_A's draw uses its own generator either way.
        self.reset_lora(restart_index=0)

    @torch.no_grad()
    def load_base_(self, weight: torch.Tensor) -> None:
        """Set the frozen base from a float weight (out, in): copied, or quantized with ``quantize``."""
        want = (self.out_features, self.in_features)
        if tuple(weight.shape) != want or not weight.is_floating_point():
            # copy_ would broadcast a (in,) or (1, in) tensor; an int8 weight_q would be quantized as numbers
            raise ValueError(f"load_base_ of layer {self.name or '<unnamed>'}: expected a float weight of shape "
                             f"{want}, got {weight.dtype} {tuple(weight.shape)} (an int8 layer's stored weight "
                             "moves with load_state_dict, not load_base_)")
        if self.quantize:
            quant.load_weight_(self, weight)
        else:
            self.weight.copy_(weight)

    def from_replaced_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight as the replaced layer stores it (a Conv1D's (in, out)) in this layer's (out, in)."""
        return weight if self.base_type is nn.Linear else weight.T

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # The replaced layer's own state (the base model's checkpoint, loaded into a model wrapped on the meta
        # device and materialized): its weight is this layer's base, transposed from a Conv1D's layout and
        # quantized for an int8 base. A wrapped layer's state always holds lora_A; LoRA factors and counters
        # then keep their fresh start (missing keys, as for any partial load).
        key = prefix + "weight"
        if key in state_dict and prefix + "lora_A" not in state_dict:
            weight = self.from_replaced_layout(state_dict.pop(key))
            if self.quantize and weight.is_floating_point() and weight.dim() == 2:
                q, scale, residual = quant.quantized_base(self, weight)
                state_dict.update({prefix + "weight_q": q, prefix + "weight_scale": scale,
                                   prefix + "weight_residual": residual})
            else:
                state_dict[key] = weight
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn, recurse=True):
        # The merge residuals (int8's, merge_residual) stay in host memory: .to(device)/.cuda()/.bfloat16() skip them.
        host = {k: self._buffers.pop(k) for k in self.HOST_BUFFERS if self._buffers.get(k) is not None}
        # An int8 base's per-channel scale moves with weight_q but keeps its dtype: .half() (DeepSpeed's fp16
        # engine does it) would round scales below 6e-5 and zero rows below 3e-8; .float() would store what
        # the merge, which writes bf16 scales, no longer matches.
        scale = self._buffers.pop("weight_scale") if self.quantize else None
        was_meta = self.lora_A.is_meta
        try:
            return super()._apply(fn, recurse)
        finally:
            if was_meta and not self.lora_A.is_meta:
                # to_empty after a meta build: the factors and merge_count hold uninitialized memory (NaN, 1e35,
                # any count), and a load of the base model's weights alone would leave them so. Start them as a
                # fresh layer does (A Kaiming, B 0, no merge yet); a load of a wrapped model's state overwrites.
                self.merge_count.zero_()
                self.reset_lora(restart_index=0)
            # Off the meta device (to_empty after a meta build): host buffers become real, zero, host tensors
            # (a residual of zero), which load_state_dict then fills; on meta they could hold nothing.
            if not self.lora_A.is_meta:
                host = {k: torch.zeros_like(v, device="cpu") if v.is_meta else v for k, v in host.items()}
            self._buffers.update(host)
            if scale is not None:
                device = self.weight_q.device
                self._buffers["weight_scale"] = (torch.ones_like(scale, device=device)
                                                 if scale.is_meta and device.type != "meta" else scale.to(device))

    @torch.no_grad()
    def reset_lora(self, restart_index: int, A: torch.Tensor | None = None) -> None:
        """A ← Kaiming-uniform from the (seed, name, restart) generator (``A``: that draw, made already by
        the caller); B ← 0."""
        if self.lora_A.is_meta:  # built on meta: nothing to draw into (to_empty + a load fills it)
            return
        if A is None:
            A = self.draw_A(restart_index)
        A = A.to(self.lora_A.dtype)
        sharded.keep_shard_(self.lora_A, A)  # FSDP2 (DTensor): this rank's shard of the draw every rank makes
        self.lora_B.zero_()

    def draw_A(self, restart_index: int) -> torch.Tensor:
        """The fp32 (CPU) Kaiming-uniform draw of ``lora_A`` for this restart, the same on every rank."""
        return kaiming_uniform_A((self.rank, self.in_features), reinit_seed(self.seed, self.name, restart_index))

    def base_weight(self) -> torch.Tensor:
        """The effective frozen weight in at least fp32 (dequantized when the base is stored in int8)."""
        if self.quantize:
            return quant.dequantized(self)
        return self.weight.to(_acc_dtype(self.weight.dtype))

    def delta_weight(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> torch.Tensor:
        """scale · B·A in fp32 (fp64 when the factors or a float base are fp64); A and B default to this
        layer's (pass fp32 masters under DeepSpeed)."""
        A = self.lora_A if A is None else A
        B = self.lora_B if B is None else B
        acc = _acc_dtype(A.dtype if self.quantize else torch.promote_types(A.dtype, self.weight.dtype))
        return (B.to(acc) @ A.to(acc)) * self.scale

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """base + scale·B·A as the replaced layer stores its weight (a Conv1D's (in, out)), summed in fp32 and
        cast once to ``dtype`` (default: the base weight's; an int8 base: the LoRA factors'): what `unwrap` puts
        back; the layer is not changed. A layer sharded by FSDP2 gathers its tensors (a collective: every rank
        calls it)."""
        A, B = sharded.whole(self.lora_A), sharded.whole(self.lora_B)
        if self.quantize:
            base = quant.dequantized(self, q=sharded.whole(self.weight_q))
        else:
            weight = sharded.whole(self.weight)
            base = weight.to(_acc_dtype(weight.dtype))
        dtype = dtype or (A.dtype if self.quantize else self.weight.dtype)
        return self.from_replaced_layout((base + self.delta_weight(A, B).to(A.device)).to(dtype))

    @torch.no_grad()
    def merge_(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> None:
        """W += scale · B·A, accumulated in fp32 (fp64 for fp64 W) and cast once to W's dtype.

        On CUDA this is the one-pass Triton merge kernel (no atomics, so every rank computes the same bits).
        An int8 base is requantized with error feedback (relora_ds/quant.py), so merges do not drift beyond the
        residual's own rounding (at most scale/508 per element and merge; 1000 independent merges: 1.008× the
        one-shot error, launch/bench_merge_rounding.py); so is a float base with ``merge_residual`` (the torch
        path: merges are rare next to training steps).
        A layer sharded by FSDP2 (DTensors) merges the whole weight, gathered, as one process would, and each
        rank keeps its shard (relora_ds/sharded.py).
        """
        A = self.lora_A if A is None else A
        B = self.lora_B if B is None else B
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape != (self.out_features,
                                                                                       A.shape[0]):
            raise ValueError(f"merge_: expected A (r, {self.in_features}) and B ({self.out_features}, r) for this "
                             f"{self.out_features}x{self.in_features} layer; got A {tuple(A.shape)} and B "
                             f"{tuple(B.shape)}")
        base = self.weight_q if self.quantize else self.weight
        if not any(map(sharded.is_sharded, (base, A, B))):
            self._merge_into(base, A, B)
            return
        full = sharded.whole(base)
        self._merge_into(full, sharded.whole(A), sharded.whole(B))
        sharded.keep_shard_(base, full)

    def _merge_into(self, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
        """The merge into ``base`` (this layer's weight, or weight_q for an int8 base, or the whole of either)."""
        self.last_update_norms = update_norms(self, base, A, B)
        if self.quantize:
            quant.merge_(self, A, B, q=base)
            return
        A, B = A.to(base.device), B.to(base.device)
        if self.merge_residual is None and base.dtype != torch.float64 and relora_kernels.use_triton(base):
            relora_kernels.lora_merge_(base, A, B, self.scale)
            return
        acc = _acc_dtype(torch.promote_types(A.dtype, base.dtype))
        delta = (B.to(acc) @ A.to(acc)) * self.scale
        if self.merge_residual is not None:  # error feedback: W + residual + s·B·A, rounded once, remainder kept
            exact = base.to(_acc_dtype(base.dtype)) + self.merge_residual.to(base.device, torch.float32) + delta
            base.copy_(exact.to(base.dtype))
            # In exact's dtype: base.float() put an fp64 base's own fp32 rounding error in the residual, which
            # the next merge added to W (W drifted under zero updates).
            self.merge_residual.copy_((exact - base.to(exact.dtype)).to(torch.bfloat16).cpu())
            return
        base.copy_((base.to(_acc_dtype(base.dtype)) + delta).to(base.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key in self.HOST_BUFFERS:
            buf = self._buffers.get(key)
            if buf is not None and buf.device.type not in ("cpu", "meta"):
                _to_host(buf)  # FSDP2's fully_shard moved it (buf.data = buf.to(device), past _apply)
        # Dispatches itself (relora_kernels._runtime: under auto the cuBLAS chain for the layer, Triton for merges on
        # CUDA; RELORA_KERNELS forces a path).
        if self.quantize:
            return relora_kernels.int8_lora_linear(x, self.weight_q, self.weight_scale, self.lora_A, self.lora_B,
                                                   self.scale, self.bias, self.dropout, self.training)
        return relora_kernels.lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, self.bias,
                                          self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, dropout={self.dropout}, bias={self.bias is not None}"
                + (f", quantize={self.quantize!r}" if self.quantize else ""))


@relora_kernels.eager_under_compile  # a compiled layer (compile_layers) traces the device check above and calls
def _to_host(buf: torch.Tensor) -> None:  # this eagerly: torch.compile cannot trace a .data assignment across devices
    """Moves a host buffer that FSDP2 moved to the GPU back to the host, in place (the same buffer object)."""
    buf.data = buf.data.cpu()


def relora_layers(model: nn.Module) -> Iterator[tuple[str, ReLoRALinear]]:
    """(name, layer) for every ReLoRA layer, in module order (the same order on every rank)."""
    for name, module in model.named_modules():
        if isinstance(module, ReLoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All lora_A and lora_B parameters, in module order."""
    return [p for _, layer in relora_layers(model) for p in (layer.lora_A, layer.lora_B)]


def wrap(model: nn.Module, rank: int = 128, alpha: float | None = None, dropout: float = 0.0,
         target_modules: Iterable[str] | str | None = None, seed: int = 0, quantize: str | None = None,
         merge_residual: bool = False) -> nn.Module:
    """Replace targeted ``nn.Linear`` layers (and transformers' ``Conv1D``, GPT-2's) by ``ReLoRALinear`` in
    place and return the model.

    ``target_modules``: module names or dotted suffixes (PEFT style), default all attention and MLP
    projections of LLaMA-style models; a string is a regular expression matched against full module names,
    ``"all-linear"`` every linear layer but the output layer (both as in PEFT). A ``Conv1D``'s (in, out)
    weight is stored transposed, as ``nn.Linear``'s (out, in); `unwrap` puts a ``Conv1D`` back.
    The base weight is copied into the new layer (in int8 when quantized) and frozen; every
    other parameter, a linear's bias included, keeps its ``requires_grad`` (ReLoRA trains it full-rank). Tied weights and relora_ds's ``lm_head`` are refused.
    ``seed`` seeds lora_A's draws (see `reinit_seed`).
    ``quantize``: None (base kept in its dtype) or ``"int8"`` (per-channel int8, relora_ds/quant.py).
    ``merge_residual``: keep what each merge's rounding into a bf16/fp16 base drops (bf16, host memory) and
    add it back at the next merge, so frequent small merges are not lost (float bases only).
    """
    quant.check_quantize(quantize)
    # (_hp_mapping: ZeRO-1/2's link to the fp32 master; None once that engine is destroyed, e.g. at the switch
    # after a full-rank warm start, when the model is free to wrap)
    if is_deepspeed_engine(model) or any(getattr(p, "_hp_mapping", None) is not None for p in model.parameters()):
        raise ValueError("wrap: the model is already in a DeepSpeed engine (deepspeed.initialize built its optimizer "
                         "and ZeRO partitions from the parameters it had, so LoRA factors added now would never "
                         "train); call relora_ds.wrap(model, ...) before deepspeed.initialize")
    sharded.refuse_data_parallel_wrappers(model)
    if any(True for _ in relora_layers(model)):
        raise ValueError("model already contains ReLoRALinear layers; wrap() it only once "
                         "(use relora_ds.unwrap(model) first to start over)")
    chosen = targets.without_narrow_layers(targets.target_linears(model, target_modules, quantize), rank,
                                           target_modules)
    # Every check before the first swap: a bad setting must not leave the model half wrapped.
    for name, linear in chosen:
        check_layer_args(name, *targets.features(linear), rank, alpha, dropout)
        quant.check_not_quantized(name, linear, quantize)  # a bitsandbytes base cannot take merges either
        if quantize:
            if linear.weight.is_meta and torch.get_default_device().type != "meta":
                raise ValueError(f"quantize='int8': layer {name!r} is on the meta device (no values to quantize); "
                                 "load the weights first, or call wrap inside the same `with "
                                 "torch.device('meta'):` block that built the model")
    targets.warn_unwrapped(model, chosen, target_modules)
    training = {name: linear.training for name, linear in chosen}
    for name, linear in chosen:
        conv1d = not isinstance(linear, nn.Linear)
        with _gathered([p for p in (linear.weight, linear.bias) if p is not None]):
            layer = ReLoRALinear(*targets.features(linear), rank, alpha=alpha, dropout=dropout,
                                 bias=linear.bias is not None, name=targets.plain_name(name), seed=seed, quantize=quantize,
                                 merge_residual=merge_residual, device=linear.weight.device,
                                 dtype=linear.weight.dtype, init_base=False)
            with torch.no_grad():
                layer.load_base_(linear.weight.T if conv1d else linear.weight)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
                    layer.bias.requires_grad_(linear.bias.requires_grad)
        if hasattr(linear.weight, "ds_id"):  # partitioned like the layer it replaces before the next is built
            linear.weight.convert_to_zero_parameters(param_list=list(layer.parameters()))
        layer.base_requires_grad = linear.weight.requires_grad  # restored by unwrap
        if conv1d:
            layer.base_type = type(linear)  # what unwrap puts back
        layer.train(training[name])  # an eval-mode model stays in eval mode (no LoRA dropout)
        _set_submodule(model, name, layer)
    ignore_host_buffers_in_ddp(model)
    return model


def ignore_host_buffers_in_ddp(root: nn.Module) -> None:
    """Name the ReLoRA layers' host-memory buffers (the merge residuals) in ``root._ddp_params_and_buffers_to_ignore``:
    torch's DistributedDataParallel broadcasts every other buffer from rank 0 at construction and, with
    broadcast_buffers, at each forward, which NCCL refuses for CPU tensors. A merge given the DDP module sends
    rank 0's first (merge._broadcast_host_buffers); the DeepSpeed path relies on every rank building alike."""
    host = {f"{name}.{key}" for name, layer in relora_layers(root) for key in layer.HOST_BUFFERS
            if layer._buffers.get(key) is not None}
    if host:
        root._ddp_params_and_buffers_to_ignore = sorted(set(getattr(root, "_ddp_params_and_buffers_to_ignore", ()))
                                                       | host)


def _gathered(params: list):
    """DeepSpeed ZeRO-3 partitions (a model built under zero.Init), gathered whole for reading; other
    tensors as they are (relora_ds needs no DeepSpeed for them)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ReLoRA layer and put back a plain ``nn.Linear`` (a ``Conv1D`` where `wrap` found one),
    trainable as it was before `wrap` (trainable for layers built directly), in the layer's train/eval mode
    and the base weight's dtype (an int8 base: the LoRA factors' dtype); returns the model. Not for a model a DeepSpeed engine trains
    (its values are ZeRO-3 shards or 16-bit copies of the fp32 masters): ``relora_ds.hf.model_from_engine``
    gives a host copy to unwrap, or ``relora_ds.export_hf(engine, dir)`` writes the merged model."""
    if is_deepspeed_engine(model) or any(
            hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, layer in relora_layers(model)
            for p in (layer.lora_A, layer.lora_B)):
        raise ValueError("unwrap: the model's parameters are managed by a DeepSpeed engine (ZeRO-3 shards, or "
                         "16-bit copies of its fp32 masters); unwrap relora_ds.hf.model_from_engine(engine), a host "
                         "copy with the masters, or export with relora_ds.export_hf(engine, out_dir)")
    sharded.check_not_sharded(model, "unwrap")
    for name, layer in list(relora_layers(model)):
        dtype = layer.lora_A.dtype if layer.quantize else layer.weight.dtype
        base_type = layer.base_type
        with torch.device("meta"):  # no throw-away init (nor a draw from the global RNG): filled below
            if base_type is nn.Linear:
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
            else:  # transformers' Conv1D(nf, nx): weight (in, out), always a bias
                linear = base_type(layer.out_features, layer.in_features).to(dtype)
        linear = linear.to_empty(device=layer.lora_A.device)
        linear.train(layer.training)
        with torch.no_grad():
            linear.weight.copy_(layer.merged_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
                linear.bias.requires_grad_(layer.bias.requires_grad)
        linear.weight.requires_grad_(getattr(layer, "base_requires_grad", True))
        _set_submodule(model, name, linear)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
