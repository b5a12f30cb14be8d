"""The rank of what training changed between two exports of a model: ReLoRA's central claim (the paper's Fig. 4)
is that a sequence of rank-r merges adds up to a high-rank update, where one LoRA stays at rank r.

    python launch/update_rank.py runs/x/hf_warm_start runs/x/hf          # each layer kind, averaged
    python launch/update_rank.py A B --per-layer --json ranks.json        # every weight matrix

A and B are Hugging Face directories (``model.safetensors``, or its shards): exports of a run
(``launch/export.py`` of a checkpoint, e.g. the kept warm-start step, and the run's final ``hf/``). For every
weight matrix both hold (the embeddings and lm_head left out unless ``--all``), of ΔW = W_B - W_A it prints
the number of singular values above ``--threshold`` of the largest (``rank``), the effective rank
exp(H(σ/Σσ)) (Roy & Vetterli), and ‖ΔW‖_F / ‖W_A‖_F. Singular values in float64 on the CPU, one matrix at a
time.

Rounding. Each merge into a bf16/fp16 (or int8) base rounds the whole matrix: a full-rank change of about
2^-9 of each weight, which the 1% cut counts as rank where ‖ΔW‖/‖W‖ is small (a review measured rank 239 of
a 256x688 matrix after 4 merges of rank 32). Where both exports are a run's (their relora_ds_progress.json
records the merges, the rank and the base's dtype: relora_ds.hf.merge_record), it also prints the most
rank the merges can add (``bound``: rank x the rank-r terms between A and B) and ``above rounding``: the
singular values above both the cut and the largest singular value of the roundings' sum, modelled as
independent errors uniform over each weight's rounding step (1.1·√(R·mean(step²)/12)·(√m + √n), R roundings:
one per merge, or 2 with error feedback, --merge-residual or an int8 base). A rank above the bound is
rounding, and is said so.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

EMBEDDINGS = re.compile(r"(embed_tokens|lm_head|wte|wpe)\.weight$")


def _tensors(directory: Path) -> dict[str, str]:
    """name -> the safetensors file holding it."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no *.safetensors (a Hugging Face export: launch/export.py)")
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            where.update({name: str(f) for name in st.keys()})
    return where


def _load(path: str, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as st:
        return st.get_tensor(name).to(torch.float64)


def update_rank(delta: torch.Tensor, base: torch.Tensor, threshold: float = 0.01, floor: float | None = None) -> dict:
    """{rank, effective_rank, rel_norm} of ``delta`` (the update of the matrix ``base``); with ``floor`` (the
    largest singular value rounding alone would give) also ``above_rounding``: those above the cut and it."""
    sigma = torch.linalg.svdvals(delta.to(torch.float64))
    top = float(sigma[0]) if sigma.numel() else 0.0
    rounding = {} if floor is None else {"above_rounding": int((sigma > max(threshold * top, floor)).sum())
                                         if top else 0}
    if top == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "rel_norm": 0.0, "shape": list(delta.shape), **rounding}
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {"rank": int((sigma > threshold * top).sum()), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "rel_norm": float(torch.linalg.norm(delta) / torch.linalg.norm(base.to(torch.float64))),
            "shape": list(delta.shape), **rounding}


def _merges(directory: Path) -> dict | None:
    """The export's merge record (relora_ds.hf.merge_record, in its relora_ds_progress.json); {} for a run's
    export of a model without ReLoRA layers (the full-rank warm start); None for any other directory."""
    path = directory / "relora_ds_progress.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("relora", {})


def rounding_step(w: torch.Tensor, base_dtype: str) -> torch.Tensor:
    """Each weight's rounding step (the spacing of representable values there) in a ``base_dtype`` base: a
    bf16/fp16 ulp (2^(e - 7), 2^(e - 10)), or an int8 base's row scale, absmax/127 (relora_ds.quant)."""
    if base_dtype == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127).expand_as(w)
    mantissa = {"bfloat16": 7, "float16": 10}[base_dtype]
    exponent = torch.floor(torch.log2(w.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent - mantissa)


def rounding_plan(a: Path, b: Path) -> dict | None:
    """From the two exports' merge records: {bound: the most rank the merges between them can add, rounds:
    the independent roundings in B - A, base_dtype}; rounds 0 for a float32 base. None where either is not
    a run's export (no record: nothing known)."""
    ra, rb = _merges(a), _merges(b)
    if ra is None or rb is None or not rb:
        return None
    between = rb["merges"] - ra.get("merges", 0)
    terms = between + rb["live"] + ra.get("live", False)  # each a product of rank-r factors
    rank = max(rb["rank"], ra.get("rank", 0))
    dtype = rb["base_dtype"]
    if dtype not in ("bfloat16", "float16", "int8"):
        rounds = 0
    elif rb["merge_residual"] or dtype == "int8":  # error feedback: B's one rounding less A's
        rounds = 1 + (ra.get("base_dtype") in ("bfloat16", "float16", "int8"))
    else:
        rounds = between
    return {"bound": rank * terms, "rounds": rounds, "base_dtype": dtype, "kinds": set(rb["kinds"])}


def plan_note(a: Path, b: Path) -> str | None:
    """Why no bound or rounding floor is printed, where that is not plain; None otherwise."""
    ra, rb = _merges(a), _merges(b)
    if ra is None or rb is None:
        missing = a if ra is None else b
        return (f"{missing} has no relora_ds_progress.json (not an export of a relora_ds run, or made by "
                "export_hf without progress): the merges and their rounding are not known, and 'rank' may count "
                "the rounding of a bf16 base at each merge")
    return None


def compare(a: Path, b: Path, threshold: float = 0.01, everything: bool = False) -> dict[str, dict]:
    """Per weight matrix of both directories: update_rank of B - A; for the ReLoRA layers of a run's exports
    also ``bound`` and ``above_rounding`` (rounding_plan)."""
    ta, tb = _tensors(a), _tensors(b)
    names = [n for n in ta if n in tb and n.endswith(".weight") and (everything or not EMBEDDINGS.search(n))]
    plan = rounding_plan(a, b)
    out = {}
    for name in names:
        wa, wb = _load(ta[name], name), _load(tb[name], name)
        if wa.dim() != 2:
            continue
        if wa.shape != wb.shape:
            raise ValueError(f"{name} is {tuple(wa.shape)} in {a} but {tuple(wb.shape)} in {b}: not the same model")
        floor = None
        if plan is not None and _kind(name) in plan["kinds"]:  # a ReLoRA layer's (others train full-rank)
            step2 = rounding_step(wb, plan["base_dtype"]).pow(2).mean() if plan["rounds"] else 0.0
            # the spectrum's edge, and 10% for its finite-size fluctuation (Tracy-Widom: ~n^(-2/3), 6% at n=64)
            floor = 1.1 * float((plan["rounds"] * step2 / 12) ** 0.5 * (wa.shape[0] ** 0.5 + wa.shape[1] ** 0.5))
        out[name] = update_rank(wb - wa, wa, threshold, floor)
        if floor is not None:
            out[name]["bound"] = plan["bound"]
    if not out:
        raise ValueError(f"{a} and {b} share no weight matrices (other models?)")
    return out


def _kind(name: str) -> str:
    """A weight's layer kind: its module's name (model.layers.0.mlp.down_proj.weight: down_proj)."""
    return name.rsplit(".", 2)[-2]


def by_kind(per_layer: dict[str, dict]) -> dict[str, dict]:
    """Averages over the layers of each kind (the name's last module: q_proj, down_proj, ...)."""
    groups = defaultdict(list)
    for name, rec in per_layer.items():
        groups[_kind(name)].append(rec)
    out = {}
    for kind, recs in groups.items():
        out[kind] = {"layers": len(recs), "shape": recs[0]["shape"],
                     **{key: sum(r[key] for r in recs) / len(recs) for key in
                        ("rank", "effective_rank", "rel_norm", "above_rounding") if key in recs[0]}}
        if "bound" in recs[0]:
            out[kind]["bound"] = recs[0]["bound"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the earlier Hugging Face directory (e.g. the warm start's export)")
    ap.add_argument("b", type=Path, help="the later one")
    ap.add_argument("--threshold", type=float, default=0.01,
                    help="a singular value counts toward `rank` above this fraction of the largest (default 0.01)")
    ap.add_argument("--per-layer", action="store_true", help="a row per weight matrix, not per layer kind")
    ap.add_argument("--all", action="store_true", help="include the embeddings and lm_head")
    ap.add_argument("--json", type=Path, help="also write every matrix's numbers here")
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 1:
        ap.error(f"--threshold {args.threshold} must be in (0, 1)")
    for d in (args.a, args.b):
        if not d.is_dir():
            ap.error(f"{d} is not a directory (give two Hugging Face exports: launch/export.py)")
    try:
        per_layer = compare(args.a, args.b, args.threshold, args.all)
    except ValueError as e:
        ap.error(str(e))
    rows = per_layer if args.per_layer else by_kind(per_layer)
    width = max(len(k) for k in rows)
    known = any("bound" in rec for rec in rows.values())
    print(f"{'matrix' if args.per_layer else 'kind':<{width}}  {'shape':>12}  {'rank':>8}  {'eff. rank':>9}  "
          f"{'|dW|/|W|':>8}" + (f"  {'bound':>6}  {'above rounding':>14}" if known else ""))
    for key, rec in rows.items():
        shape = "x".join(map(str, rec["shape"]))
        extra = f"  {rec['bound']:>6}  {rec['above_rounding']:>14.1f}" if "bound" in rec else ""
        print(f"{key:<{width}}  {shape:>12}  {rec['rank']:>8.1f}  {rec['effective_rank']:>9.1f}  "
              f"{rec['rel_norm']:>8.4f}{extra}")
    over = sorted(name for name, rec in per_layer.items() if rec["rank"] > rec.get("bound", float("inf")))
    if over:
        plan = rounding_plan(args.a, args.b)
        print(f"warning: {len(over)} matrices (e.g. {over[0]}) have a rank above the {plan['bound']} the merges "
              f"between the exports can add (rank-r terms x r): the excess is the {plan['base_dtype']} base's "
              "rounding at each merge, full-rank and larger than the 1% cut where |dW|/|W| is small. 'above "
              "rounding' counts past it; a run with --merge-residual (bf16) rounds once in all", file=sys.stderr)
    elif plan_note(args.a, args.b):
        print(f"note: {plan_note(args.a, args.b)}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "threshold": args.threshold,
                                         "matrices": per_layer}, indent=1) + "\n")
    return per_layer


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
