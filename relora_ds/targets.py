"""Which layers ReLoRA converts: ``target_modules`` (PEFT's forms) resolved to a model's linear layers.

A list names modules or dotted suffixes, a string is a regular expression on full module names or
``"all-linear"`` (every linear layer but the output layer); "linear" means ``nn.Linear`` and transformers'
``Conv1D`` (GPT-2's projections, ``y = x·W + b`` with W stored (in, out)). Every refusal and warning about
the choice lives here, so `relora_ds.wrap` (relora.py) only converts what it is handed.
"""
from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import quant

# LLaMA-family names, and Phi-3's fused qkv_proj / gate_up_proj (a model uses whichever it has).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                          "gate_up_proj")
# Output heads 'all-linear' leaves out where the model does not name its output layer
# (get_output_embeddings): the LM head, and PEFT's sequence-classification head names.
HEAD_NAMES = ("lm_head", "score", "classifier")
_LINEAR = "linear layer (nn.Linear or transformers' Conv1D)"


def plain_name(name: str) -> str:
    """A module name without torch.compile's ``_orig_mod.``: targets match, and draws are seeded by, the name
    the uncompiled model has."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _matches(name: str, targets: Iterable[str]) -> bool:
    # PEFT semantics: a target matches the full module name or its trailing dotted suffix.
    return any(name == t or name.endswith("." + t) for t in targets)


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2, GPT, DistilGPT-2...: ``y = x·W + b`` with W stored (in, out)), when
    transformers is loaded; a model holding one has imported it, so no import here."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear(module: nn.Module) -> bool:
    """A layer ReLoRA converts: ``nn.Linear``, or transformers' ``Conv1D`` (the same map, weight transposed)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (from attributes: a ZeRO-3 weight is empty)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf


# nn.Linear subclasses that override forward with the same map (Falcon's ``x @ W.T + b``): taken without a probe,
# also where their weight cannot be run (meta, a ZeRO-3 partition).
_SAME_MAP_SUBCLASSES = ("transformers.models.falcon.modeling_falcon.FalconLinear",)


def _other_forward(layer: nn.Module) -> str | None:
    """Why ``layer`` is no ``y = x·Wᵀ + b`` although it is an nn.Linear (or Conv1D) subclass, or None: a class that
    overrides forward may compute something else (Llama 4's and Phi-MoE's routers return a tuple after top-k, a
    grouped linear multiplies blocks), which a ReLoRA layer's plain linear map would replace. Its forward is
    probed on three random rows against the plain map; a weight that cannot run (meta, partitioned) cannot be
    probed. Integer (already quantized) weights are quant.check_not_quantized's to name."""
    base = nn.Linear if isinstance(layer, nn.Linear) else _conv1d_class()
    cls = type(layer)
    if cls.forward is base.forward or f"{cls.__module__}.{cls.__qualname__}" in _SAME_MAP_SUBCLASSES:
        return None
    w, b = layer.weight, layer.bias
    if not w.is_floating_point() or quant.foreign_quantized_module(layer):
        return None
    d_in, d_out = features(layer)
    what = f"its class {cls.__name__} overrides {base.__name__}.forward"
    if w.is_meta or w.numel() != d_in * d_out:
        return f"{what}, and its weight ({'meta' if w.is_meta else 'partitioned'}) cannot be run to check that it " \
               "computes x·Wᵀ + b"
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(3, d_in, generator=g, device=w.device).to(w.dtype)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, w if base is nn.Linear else w.t(), b)
        try:
            got = layer.forward(x)
        except Exception as e:  # noqa: BLE001  whatever it raises, it is not the plain map
            return f"{what} and fails on a (3, {d_in}) input ({type(e).__name__}: {e})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"{what} and returns {shape} for a (3, {d_in}) input, not the (3, {d_out}) of x·Wᵀ + b"
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    if not err <= (1e-2 if w.element_size() <= 2 else 1e-4):
        return f"{what} and computes something other than x·Wᵀ + b (relative difference {err:.2g} on a probe)"
    return None


def _output_layer(model: nn.Module) -> nn.Module | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out if isinstance(out, nn.Module) else None


def _is_output_layer(model: nn.Module, name: str, module: nn.Module) -> bool:
    out = _output_layer(model)
    return module is out or type(module).__name__ == "LMHead" or (
        out is None and name.rpartition(".")[2] in HEAD_NAMES)


def _unwrappable(model: nn.Module, linears: list) -> dict[str, str]:
    """{name: why} for the linear layers a ReLoRA layer cannot replace."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    mha = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
           if isinstance(m, nn.MultiheadAttention)}
    why = {}
    for name, layer in linears:
        shared = [o for o in owners.get(id(layer.weight), []) if o != f"{name}.weight"]
        shared_bias = [o for o in owners.get(id(layer.bias), []) if o != f"{name}.bias"] if layer.bias is not None \
            else []
        if name in mha:
            why[name] = ("nn.MultiheadAttention reads its out_proj's weight directly and never calls the module, so a "
                         "ReLoRA layer there would never run")
        elif type(layer).__name__ == "LMHead":
            why[name] = ("relora_ds's output layer: ReLoRA trains it full-rank (as embeddings and norms), and its "
                         "chunked loss needs the plain layer")
        elif shared:
            why[name] = f"its weight is tied to {shared}: a ReLoRA layer would untie it silently"
        elif shared_bias:
            why[name] = f"its bias is shared with {shared_bias}: a ReLoRA layer would untie it silently"
        elif other := _other_forward(layer):
            why[name] = other
    return why


def _all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"  # PEFT's spelling check


def _select(model: nn.Module, linears: list, target_modules) -> list:
    """The linear layers a regular expression (PEFT: a string is matched against the full module name, here
    without torch.compile's ``_orig_mod.``) or ``"all-linear"`` (every linear layer but the output layer, and
    but those no ReLoRA layer can replace: tied, nn.MultiheadAttention's out_proj) selects."""
    if _all_linear(target_modules):
        skip = _unwrappable(model, linears)
        return [(n, m) for n, m in linears if n not in skip and not _is_output_layer(model, n, m)]
    try:
        pattern = re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({e}); a string is "
                         "matched against full module names (PEFT semantics), 'all-linear' selects every linear "
                         "layer but the output layer, and a list selects names or dotted suffixes") from None
    return [(n, m) for n, m in linears if pattern.fullmatch(plain_name(n))]


def _no_match_hint(target_modules, targets: tuple, linears: list) -> str:
    """What to write instead, for a selection that matched nothing."""
    examples = [plain_name(n) for n, _ in linears[:3]]
    if isinstance(target_modules, str):
        leaf = {n.rpartition(".")[2] for n, _ in linears} & {target_modules}
        regex = "r'.*\\." + target_modules + "'"
        return (f"; a string is a regular expression the full module name must match (e.g. {examples})"
                + (f": for every {target_modules!r} layer pass [{target_modules!r}] or {regex}" if leaf else "")
                + "; 'all-linear' selects every linear layer but the output layer")
    hint = "; target_modules='all-linear' selects every linear layer but the output layer"
    if any(re.search(r"[*+?^$\[\]()|\\]", t) for t in targets):
        hint += ("; list entries are names or dotted suffixes, a regular expression is passed as one string (in a "
                 "recipe: target_modules: '.*(q|v)_proj', not a list; the command line's --target-modules takes "
                 "names)")
    return hint


def target_linears(model: nn.Module, target_modules: Iterable[str] | str | None = None,
                   quantize: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, layer) that ``target_modules`` selects among the model's ``nn.Linear`` and transformers'
    ``Conv1D`` layers. None: the attention and MLP projections of LLaMA-style models; a list: module names or
    dotted suffixes; a string: a regular expression the full module name must match, or ``"all-linear"``
    (every linear layer but the output layer), both as in PEFT.

    An error when nothing matches, and when an explicitly given entry matches nothing although others do
    (a typo next to valid names must not silently leave a projection full-rank). The trainer calls this
    before its full-rank warm start, so a bad name fails in seconds, not at the switch to ReLoRA.
    """
    pattern = isinstance(target_modules, str)
    targets = (target_modules,) if pattern else tuple(DEFAULT_TARGET_MODULES if target_modules is None
                                                       else target_modules)
    if not targets or any(not isinstance(t, str) or not t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, a regular expression or "
                         f"'all-linear', got {target_modules!r}")
    peft = sorted(n for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"
                  and hasattr(m, "base_layer"))
    if peft:
        raise ValueError(f"the model holds PEFT adapter layers ({len(peft)}, e.g. {peft[0]!r}): ReLoRA brings its own "
                         "low-rank factors and merges them into the base weights every cycle; wrap the model without "
                         "PEFT (peft_model.merge_and_unload() keeps what PEFT trained)")
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    leaves = sorted({n.rpartition(".")[2] for n, _ in linears})
    chosen = _select(model, linears, target_modules) if pattern else [(n, m) for n, m in linears
                                                                     if _matches(n, targets)]
    # Modules a target names that are not linear layers (a fused 3-D expert weight, a custom projection...):
    # say so, rather than "matched nothing".
    if _all_linear(target_modules):
        named = lambda n: False  # noqa: E731
    elif pattern:
        named = lambda n: re.fullmatch(target_modules, plain_name(n))  # noqa: E731
    else:
        named = lambda n: _matches(n, targets)  # noqa: E731
    others = sorted({f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                     if n and not is_linear(m) and named(n) and
                     isinstance(getattr(m, "weight", None), torch.Tensor)})
    quantized = sorted((n, why) for n, m in model.named_modules() if n and not isinstance(m, nn.Linear)
                       and (named(n) or _all_linear(target_modules))
                       and (why := quant.foreign_quantized_module(m)))
    if quantized:  # GPTQ/AWQ/HQQ layers are no nn.Linear: say what they are, not "matched nothing"
        names = ", ".join(repr(n) for n, _ in quantized[:4]) + (" ..." if len(quantized) > 4 else "")
        raise quant.already_quantized_error(names, quantized[0][1], quantize)
    not_linear = (f"; these modules match by name but are neither nn.Linear nor transformers' Conv1D, which is "
                  f"all ReLoRA wraps: {others[:8]}{' ...' if len(others) > 8 else ''}") if others else ""
    if not chosen:
        raise ValueError(f"target_modules={target_modules if pattern else list(targets)!r} matched no {_LINEAR}; "
                         f"linear layer names in this model end in: {leaves}{not_linear}"
                         f"{_no_match_hint(target_modules, targets, linears)}")
    unmatched = [] if pattern else [t for t in targets if not any(_matches(n, (t,)) for n, _ in linears)]
    if unmatched and target_modules is not None:
        raise ValueError(f"target_modules {unmatched} matched no {_LINEAR}, the other entries did; linear "
                         f"layer names in this model end in: {leaves}{not_linear}")
    refused = _unwrappable(model, chosen)
    if refused:
        name, why = next(iter(refused.items()))
        more = f" (and {len(refused) - 1} more: {sorted(refused)[:4]})" if len(refused) > 1 else ""
        raise ValueError(f"target_modules selects {name!r}{more}, which no ReLoRA layer can replace: {why}; leave it "
                         "out of target_modules")
    return chosen


def without_narrow_layers(chosen: list, rank, target_modules) -> list:
    """'all-linear' leaves out, and names, the layers narrower than ``rank`` (a mixture of experts' 1-output
    shared-expert gate, a router to 8 experts at rank 128): they stay full-rank and trainable, as the layers it
    cannot replace do. A layer named explicitly is checked (and refused) by wrap's check_layer_args."""
    if not _all_linear(target_modules) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return chosen
    narrow = [n for n, m in chosen if min(features(m)) < rank]
    if narrow and len(narrow) == len(chosen):
        raise ValueError(f"target_modules='all-linear': every linear layer it selects is narrower than rank={rank} "
                         f"(min(in_features, out_features) < rank: {narrow[:4]}); choose a rank of at most "
                         f"{max(min(features(m)) for _, m in chosen)}")
    if narrow:
        warnings.warn(f"relora_ds.wrap: 'all-linear' leaves {_count(len(narrow), 'linear layer')} narrower than "
                      f"rank={rank} full-rank and trainable: {narrow[:6]}{' ...' if len(narrow) > 6 else ''}",
                      stacklevel=3)
    return [(n, m) for n, m in chosen if n not in narrow]


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def warn_unwrapped(model: nn.Module, chosen: list, target_modules) -> None:
    """With the default targets, name the other linear layers that stay full-rank trainable (a fused
    ``qkv_proj`` of an architecture the defaults do not know...); the output layer is meant to. With the
    default targets or 'all-linear', name the trainable weights no ReLoRA layer takes (in no linear layer,
    or in one it cannot replace)."""
    if target_modules is not None and not _all_linear(target_modules):
        return
    out_emb = _output_layer(model)
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    picked = {id(m) for _, m in chosen}
    cannot = _unwrappable(model, linears)
    left = [n for n, m in linears if id(m) not in picked and n not in cannot and not _is_output_layer(model, n, m)]
    if left and target_modules is None:
        warnings.warn(f"relora_ds.wrap: the default target_modules {list(DEFAULT_TARGET_MODULES)} leave "
                      f"{_count(len(left), 'other linear layer')} full-rank and trainable: {left[:6]}"
                      f"{' ...' if len(left) > 6 else ''}; pass target_modules to choose them explicitly "
                      "('all-linear': every linear layer but the output layer)", stacklevel=3)
    # Weights in no linear layer at all: a mixture of experts' fused expert tensors (transformers 5 keeps each
    # layer's experts as 3-D gate_up_proj / down_proj parameters), nn.MultiheadAttention's in_proj_weight; and
    # in a linear layer no ReLoRA layer can replace (its out_proj). They train full-rank, MoE experts most of
    # the model.
    other = [(f"{mn}.{pn}" if mn else pn, p) for mn, m in model.named_modules()
             if not (is_linear(m) or isinstance(m, nn.Embedding)) and m is not out_emb
             for pn, p in m.named_parameters(recurse=False) if p.requires_grad and p.dim() >= 2]
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a tied head: trains as one
    other += [(f"{n}.weight", m.weight) for n, m in linears if n in cannot and m.weight.requires_grad
              and not _is_output_layer(model, n, m) and id(m.weight) not in embedded]
    if other:
        names = [f"{n} {tuple(p.shape)}" for n, p in other]
        total = sum(p.numel() for _, p in other)
        warnings.warn(f"relora_ds.wrap: {_count(len(other), 'trainable weight')} no ReLoRA layer takes stay "
                      f"full-rank ({total:,} parameters): {names[:4]}{' ...' if len(names) > 4 else ''}; wrap converts "
                      "only nn.Linear and transformers' Conv1D layers (a mixture of experts' fused 3-D expert "
                      "weights, nn.MultiheadAttention's projections are neither or cannot be replaced, nor a layer "
                      "whose weight or bias is shared with another)",
                      stacklevel=3)
