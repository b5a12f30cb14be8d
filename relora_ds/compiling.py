"""``--compile`` (LlamaForCausalLM.compile_layers): the start-up check that torch.compile can build code on
this machine, and what it compiled, read from torch.compile's own counters after the first step of each
engine, so a run's log says how many graphs its layers became and what broke them (a graph break runs that
part of the layer eagerly, and is easy to miss)."""
from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from collections import Counter


# Backends torch registers whose compiler is another package, imported at the first compile (after the data and
# the engine): (package, what to install).
_BACKEND_PACKAGES = {"tvm": ("tvm", "apache-tvm"), "openxla": ("torch_xla", "torch_xla"),
                     "openxla_eval": ("torch_xla", "torch_xla")}
# torch's minifiers, registered as backends but no compiler: they take the compiler to minify as an argument.
_MINIFIERS = ("dynamo_minifier_backend", "dynamo_accuracy_minifier_backend")


def compile_problem(cuda: bool, backend: str = "inductor") -> str | None:
    """Why torch.compile with ``backend`` cannot build code here, or None: a backend torch does not have, one whose
    package is not installed (tvm, openxla), a minifier, cudagraphs without a GPU; inductor (the default) on a GPU
    writes Triton kernels, on the CPU C++ that a C++ compiler builds."""
    if backend != "inductor":
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        # not offered: torch's own test doubles, and the minifiers
        shown = ", ".join(name for name in known if "TESTING_ONLY" not in name and name not in _MINIFIERS)
        if backend not in known:
            return f"compile_backend={backend!r} is not one of torch's backends: {shown}"
        if backend in _MINIFIERS:
            return (f"compile_backend={backend!r} is torch's minifier, not a compiler (TORCHDYNAMO_REPRO_AFTER "
                    f"runs it around one); use one of: {shown}")
        if backend in _BACKEND_PACKAGES and importlib.util.find_spec(_BACKEND_PACKAGES[backend][0]) is None:
            return (f"compile_backend={backend!r} compiles with {_BACKEND_PACKAGES[backend][1]}, which is not "
                    "installed; install it, or use another backend (inductor, aot_eager)")
        if backend == "cudagraphs" and not cuda:
            return ("compile_backend='cudagraphs' records CUDA graphs, and this run has no GPU (torch skips them, "
                    "with a log line); use inductor or aot_eager")
        if backend != "cudagraphs" and (failure := _trial_compile(backend)):  # (it skips CPU tensors, with a log line)
            return (f"compile_backend={backend!r} failed to compile a one-line function here ({failure}); use "
                    "inductor or aot_eager")
        return None
    if cuda:
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on a GPU generates Triton kernels, and triton is not installed"
        return None
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as e:  # torch._inductor.exc.InvalidCxxCompiler
        return (f"torch.compile on the CPU builds C++, and no C++ compiler works here ({e}); install g++ "
                "or clang++, or set CXX to one")
    return None


@functools.lru_cache(maxsize=None)  # once per process and backend: each engine build of a run checks it
def _trial_compile(backend: str) -> str | None:
    """The first line of the error torch.compile with ``backend`` raises on a product and its backward (CPU
    tensors), or None. A backend can be registered and still fail on every graph: the TorchScript ones (``ts``,
    ``aot_ts``) cannot script torch.fx's graph modules in torch 2.13 ("method cannot be used as a value"), which
    a run saw only at its first step. torch.compile's counters (:func:`compile_stats`) are left as they were."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    saved = copy.deepcopy(counters)
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation warnings: the error says what matters
            warnings.simplefilter("ignore")
            x = torch.ones(2, requires_grad=True)
            torch.compile(lambda t: (t * 2 + 1).sum(), backend=backend)(x).backward()
        return None
    except Exception as e:  # torch._dynamo.exc.BackendCompilerFailed, wrapping the backend's own error
        cause = getattr(e, "inner_exception", None) or e.__cause__ or e
        text = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        return f"{type(cause).__name__}: {text}"
    finally:
        counters.clear()
        counters.update(saved)


def compile_stats() -> dict:
    """``{"graphs": n, "graph_breaks": n, "break_reasons": {reason: count}, "recompile_limit_hits": n}`` for
    this process so far (since the last ``torch._dynamo.reset()``, which the trainer calls at the warm-start
    switch); a reason is the first line of torch's message (its most frequent five). A recompile-limit hit means
    that a compiled function runs eagerly from then on, which torch reports only as a log line."""
    from torch._dynamo.utils import counters

    reasons = Counter()
    for reason, n in counters["graph_break"].items():
        reasons[str(reason).strip().splitlines()[0]] += n
    limit_hits = sum(n for reason, n in counters["unimplemented"].items()
                     if re.search(r"recompile.limit|cache.size.limit", str(reason), re.IGNORECASE))
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(reasons.values()),
            "break_reasons": dict(reasons.most_common(5)), "recompile_limit_hits": limit_hits}


def cache_entries(model) -> int | None:
    """The most cache entries torch.compile holds for the decoder layers' forward (the layers share its code
    object): each is a graph for a kind of layer in a mode (training, under selective checkpointing or not;
    evaluation), and past torch's recompile limit of them a call that matches none runs eagerly. None where
    this torch cannot say (a private API, torch._dynamo.eval_frame._debug_get_cache_entry_list)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    codes = {type(layer).forward.__code__ for layer in model.model.layers}
    return max(len(_debug_get_cache_entry_list(code)) for code in codes)


def _limit_option(config) -> str:
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7


def recompile_limit() -> int:
    """torch's recompile limit (``cache_size_limit`` before torch 2.7)."""
    import torch

    return getattr(torch._dynamo.config, _limit_option(torch._dynamo.config))


def raise_recompile_limit(entries: int) -> None:
    """torch's recompile limit (process-wide) to ``entries`` where it is lower."""
    import torch

    config = torch._dynamo.config
    setattr(config, _limit_option(config), max(getattr(config, _limit_option(config)), entries))


def compile_warnings(stats: dict, last: dict | None) -> list[str]:
    """The warnings for what ``stats`` (compile_stats) adds to the ``last`` report: new graph breaks, new
    recompile-limit hits."""
    last = last or {"graph_breaks": 0, "recompile_limit_hits": 0}
    out = []
    if stats["graph_breaks"] > last["graph_breaks"]:
        why = "; ".join(f"{n}x {reason}" for reason, n in stats["break_reasons"].items())
        out.append(f"compile: torch.compile broke the decoder layers' graphs {stats['graph_breaks']} times "
                   f"({why}); those parts run eagerly.")
    if stats["recompile_limit_hits"] > last["recompile_limit_hits"]:
        out.append(f"compile: torch.compile reached its recompile limit {stats['recompile_limit_hits']} times: the "
                   "code it stopped on runs eagerly from then on (TORCH_LOGS=recompiles says why it recompiled)")
    return out
