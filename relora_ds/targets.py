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


def _output_layer(model: nn.Module) -> nn.Module | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out if isinstance(out, nn.Module) else None


def _select(model: nn.Module, linears: list, target_modules) -> list:
    """The linear layers a regular expression (PEFT: a string is matched against the full module name)
    or ``"all-linear"`` (every linear layer but the output layer) selects."""
    if target_modules == "all-linear":
        out = _output_layer(model)
        return [(n, m) for n, m in linears if m is not out and type(m).__name__ != "LMHead"
                and not (out is None and n.rpartition(".")[2] == "lm_head")]
    try:
        pattern = re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({e}); a string is "
                         "matched against full module names (PEFT semantics), 'all-linear' selects every linear "
                         "layer but the output layer, and a list selects names or dotted suffixes") from None
    return [(n, m) for n, m in linears if pattern.fullmatch(n)]


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
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    leaves = sorted({n.rpartition(".")[2] for n, _ in linears})
    chosen = _select(model, linears, target_modules) if pattern else [(n, m) for n, m in linears
                                                                     if _matches(n, targets)]
    # Modules a target names that are not linear layers (a fused 3-D expert weight, a custom projection...):
    # say so, rather than "matched nothing".
    named = ((lambda n: re.fullmatch(target_modules, n)) if pattern and target_modules != "all-linear"
             else (lambda n: not pattern and _matches(n, targets)))
    others = sorted({f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                     if n and not is_linear(m) and named(n) and
                     isinstance(getattr(m, "weight", None), torch.Tensor)})
    quantized = sorted((n, why) for n, m in model.named_modules() if n and not isinstance(m, nn.Linear)
                       and (named(n) or target_modules == "all-linear")
                       and (why := quant.foreign_quantized_module(m)))
    if quantized:  # GPTQ/AWQ/HQQ layers are no nn.Linear: say what they are, not "matched nothing"
        names = ", ".join(repr(n) for n, _ in quantized[:4]) + (" ..." if len(quantized) > 4 else "")
        raise quant.already_quantized_error(names, quantized[0][1], quantize)
    not_linear = (f"; these modules match by name but are neither nn.Linear nor transformers' Conv1D, which is "
                  f"all ReLoRA wraps: {others[:8]}{' ...' if len(others) > 8 else ''}") if others else ""
    if not chosen:
        how = ("" if pattern else
               "; target_modules='all-linear' selects every linear layer but the output layer")
        raise ValueError(f"target_modules={target_modules if pattern else list(targets)!r} matched no nn.Linear "
                         f"layer; linear layer names in this model end in: {leaves}{not_linear}{how}")
    unmatched = [] if pattern else [t for t in targets if not any(_matches(n, (t,)) for n, _ in linears)]
    if unmatched and target_modules is not None:
        raise ValueError(f"target_modules {unmatched} matched no nn.Linear layer (the others did); linear layer "
                         f"names in this model end in: {leaves}{not_linear}")
    chosen_names = {name for name, _ in chosen}
    bypassed = [f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention) and (f"{n}.out_proj" if n else "out_proj") in chosen_names]
    if bypassed:
        raise ValueError(f"target_modules selects {bypassed}: nn.MultiheadAttention reads its out_proj's weight "
                         "directly and never calls the module, so a ReLoRA layer there would never run; "
                         "leave it out of target_modules")
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, linear in chosen:
        if type(linear).__name__ == "LMHead":
            raise ValueError(f"target_modules selects {name!r}, relora_ds's output layer: ReLoRA trains it "
                             "full-rank (as embeddings and norms), and its chunked loss needs the plain layer")
        shared = [o for o in owners[id(linear.weight)] if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"target_modules selects {name!r}, whose weight is tied to {shared}: a ReLoRA layer "
                             "would untie it silently; leave it out of target_modules")
    return chosen


def warn_unwrapped(model: nn.Module, chosen: list, target_modules) -> None:
    """With the default targets, name the other linear layers that stay full-rank trainable (a fused
    ``qkv_proj`` of an architecture the defaults do not know...); the output embedding is meant to. With the
    default targets or 'all-linear', name the trainable weights that are no linear layer at all."""
    if target_modules is not None and target_modules != "all-linear":
        return
    out_emb = _output_layer(model)
    picked = {id(m) for _, m in chosen}
    left = [n for n, m in model.named_modules() if is_linear(m) and id(m) not in picked
            and m is not out_emb and type(m).__name__ != "LMHead" and n.rpartition(".")[2] != "lm_head"]
    if left and target_modules is None:
        warnings.warn(f"relora_ds.wrap: the default target_modules {list(DEFAULT_TARGET_MODULES)} leave "
                      f"{len(left)} other linear layers full-rank and trainable: {left[:6]}"
                      f"{' ...' if len(left) > 6 else ''}; pass target_modules to choose them explicitly "
                      "('all-linear': every linear layer but the output layer)", stacklevel=3)
    # Weights in no linear layer at all: a mixture of experts' fused expert tensors (transformers 5 keeps each
    # layer's experts as 3-D gate_up_proj / down_proj parameters). wrap() converts only nn.Linear and
    # Conv1D, so these train full-rank, usually most of the model.
    other = [(f"{mn}.{pn}" if mn else pn, p) for mn, m in model.named_modules()
             if not (is_linear(m) or isinstance(m, nn.Embedding)) and m is not out_emb
             for pn, p in m.named_parameters(recurse=False) if p.requires_grad and p.dim() >= 2]
    if other:
        names = [f"{n} {tuple(p.shape)}" for n, p in other]
        total = sum(p.numel() for _, p in other)
        warnings.warn(f"relora_ds.wrap: {len(other)} trainable weights that are not in linear layers stay "
                      f"full-rank ({total:,} parameters): {names[:4]}{' ...' if len(names) > 4 else ''}; wrap converts "
                      "only nn.Linear and transformers' Conv1D (a mixture of experts' fused 3-D expert weights are "
                      "neither)", stacklevel=3)
