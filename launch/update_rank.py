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


def update_rank(delta: torch.Tensor, base: torch.Tensor, threshold: float = 0.01) -> dict:
    """{rank, effective_rank, rel_norm} of ``delta`` (the update of the matrix ``base``)."""
    sigma = torch.linalg.svdvals(delta.to(torch.float64))
    top = float(sigma[0]) if sigma.numel() else 0.0
    if top == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "rel_norm": 0.0, "shape": list(delta.shape)}
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {"rank": int((sigma > threshold * top).sum()), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "rel_norm": float(torch.linalg.norm(delta) / torch.linalg.norm(base.to(torch.float64))),
            "shape": list(delta.shape)}


def compare(a: Path, b: Path, threshold: float = 0.01, everything: bool = False) -> dict[str, dict]:
    """Per weight matrix of both directories: update_rank of B - A."""
    ta, tb = _tensors(a), _tensors(b)
    names = [n for n in ta if n in tb and n.endswith(".weight") and (everything or not EMBEDDINGS.search(n))]
    out = {}
    for name in names:
        wa, wb = _load(ta[name], name), _load(tb[name], name)
        if wa.dim() != 2:
            continue
        if wa.shape != wb.shape:
            raise ValueError(f"{name} is {tuple(wa.shape)} in {a} but {tuple(wb.shape)} in {b}: not the same model")
        out[name] = update_rank(wb - wa, wa, threshold)
    if not out:
        raise ValueError(f"{a} and {b} share no weight matrices (other models?)")
    return out


def by_kind(per_layer: dict[str, dict]) -> dict[str, dict]:
    """Averages over the layers of each kind (the name's last module: q_proj, down_proj, ...)."""
    groups = defaultdict(list)
    for name, rec in per_layer.items():
        groups[name.rsplit(".", 2)[-2]].append(rec)
    return {kind: {"layers": len(recs), "shape": recs[0]["shape"],
                   "rank": sum(r["rank"] for r in recs) / len(recs),
                   "effective_rank": sum(r["effective_rank"] for r in recs) / len(recs),
                   "rel_norm": sum(r["rel_norm"] for r in recs) / len(recs)} for kind, recs in groups.items()}


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
    print(f"{'matrix' if args.per_layer else 'kind':<{width}}  {'shape':>12}  {'rank':>8}  {'eff. rank':>9}  "
          f"{'|dW|/|W|':>8}")
    for key, rec in rows.items():
        shape = "x".join(map(str, rec["shape"]))
        print(f"{key:<{width}}  {shape:>12}  {rec['rank']:>8.1f}  {rec['effective_rank']:>9.1f}  "
              f"{rec['rel_norm']:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "threshold": args.threshold,
                                         "matrices": per_layer}, indent=1) + "\n")
    return per_layer


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
