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

Rounding. Each merge into a bf16/fp16 (or int8) base rounds the whole matrix: a full-rank change of up to
2^-8 of each weight, which the 1% cut counts as rank where ‖ΔW‖/‖W‖ is small (a review measured rank 239 of
a 256x688 matrix after 4 merges of rank 32). Where both exports are a run's (their relora_ds_progress.json
records the layers' merges, rank and base dtype: relora_ds.hf.merge_record), it also prints the most rank
the merges can add (``bound``: rank x the rank-r terms between A and B) and ``above rounding``: the singular
values above both the cut and the edge of the roundings' spectrum, (√m + √n)·√(Σ R·mean(step²)/4) over R
roundings of each kind (one per merge, or 2 with error feedback, --merge-residual or an int8 base; and each
export's own cast to bf16): each moves a weight by at most half its rounding step (a bound; uniform errors
would give a third of that variance), taken as independent from weight to weight. A rank above the bound
is rounding, and is said so.
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

from cli_types import DefaultsHelpFormatter, check_writable, tolerant_stdout, user_path  # launch/

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


def _progress(directory: Path) -> dict | None:
    """The export's relora_ds_progress.json (its step, merge record, ...), or None where it has none (another
    tool's export)."""
    path = directory / "relora_ds_progress.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _merges(directory: Path) -> dict | None:
    """The export's merge record (relora_ds.hf.merge_record, in its relora_ds_progress.json); {} for a run's
    export of a model without ReLoRA layers (the full-rank warm start); None where unknown (_unknown_why)."""
    return None if _unknown_why(directory) else _progress(directory).get("relora", {})


def _unknown_why(directory: Path) -> str | None:
    """Why the export's merges are not known, or None where they are. A run's exports recorded no merges before
    2026-12-05 (a progress file with the sampler but neither a merge record nor ``document_masking``, both
    written since: it reads as a full-rank export, whatever its phase), then, for an hour, the layers' kinds
    and the export copy's dtype (fp32 for a bf16 base) in place of the ReLoRA layers' names and the base's."""
    progress = _progress(directory)
    if progress is None:
        return ("no relora_ds_progress.json: not a relora_ds run's export, or one made by export_hf without "
                "progress")
    record = progress.get("relora", {})
    if record is None:
        return "its relora_ds_progress.json records none (an export of a checkpoint from before merge counts)"
    if "relora" not in progress and "sampler" in progress and "document_masking" not in progress:
        return "its relora_ds_progress.json is from before 2026-12-05, when a run's exports recorded no merges"
    if record and "layers" not in record:
        return ("its relora_ds_progress.json is from 2026-12-05's first merge record, which named the layers' "
                "kinds, not the ReLoRA layers, and the export copy's dtype, not the base's")
    return None


def _step(directory: Path) -> int | None:
    """The training step the export holds, or None where unknown."""
    return (_progress(directory) or {}).get("step")


LOW = ("bfloat16", "float16", "int8")  # bases a merge rounds


def rounding_step(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """Each weight's rounding step (the spacing of representable values there) in ``dtype``: a bf16/fp16
    ulp (2^(e - 7), 2^(e - 10)), or an int8 base's row scale, absmax/127 (relora_ds.quant)."""
    if dtype == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127).expand_as(w)
    mantissa = {"bfloat16": 7, "float16": 10}[dtype]
    exponent = torch.floor(torch.log2(w.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent - mantissa)


def _export_dtype(directory: Path) -> str | None:
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    return config.get("dtype") or config.get("torch_dtype")


def rounding_plan(a: Path, b: Path) -> dict | None:
    """From the two exports' merge records: {bound: the most rank the merges between them can add, roundings:
    [(how many, dtype)] of the independent roundings in B - A, ...}. None where either export's merges are not
    known. The roundings: one per merge into a bf16/fp16 base (and the switch's, from a full-rank A), or with
    error feedback (merge_residual, an int8 base) B's one and A's; and each export's own cast to bf16/fp16,
    unless it held nothing to round (its base in that dtype, no live factors)."""
    ra, rb = _merges(a), _merges(b)
    sa, sb = _step(a), _step(b)
    if ra and rb == {} and sa is not None and sb is not None and sb < sa:  # B: the warm start, before A's ReLoRA
        raise ValueError(f"{a} has ReLoRA layers and {b} none (a full-rank export of step {sb}, before {a}'s step "
                         f"{sa}): the first export is the later one; give the earlier export first")
    if ra is None or rb is None or not rb:
        return None
    between = rb["merges"] - ra.get("merges", 0)
    if between < 0:
        raise ValueError(f"{a} records {ra['merges']} merges and {b} {rb['merges']}: the first export is the later "
                         "one; give the earlier export first")
    terms = between + rb["live"] + ra.get("live", False)  # each a product of rank-r factors
    base = rb["base_dtype"]
    roundings = []
    if base in LOW:
        feedback = rb["merge_residual"] or base == "int8"  # B's one rounding less A's
        # without it one per merge, and from a full-rank A (no ReLoRA layers: its fp32 masters) one more, the
        # switch's, which rounds them into the frozen base
        roundings.append((1 + (ra.get("base_dtype") in LOW) if feedback else between + (not ra), base))
    for directory, record in ((a, ra), (b, rb)):
        cast = _export_dtype(directory)
        if cast in ("bfloat16", "float16") and not (record.get("base_dtype") == cast and not record.get("live")):
            roundings.append((1, cast))
    return {"bound": max(rb["rank"], ra.get("rank", 0)) * terms, "roundings": [r for r in roundings if r[0]],
            "base_dtype": base, "merge_residual": rb["merge_residual"], "layers": set(rb["layers"])}


def plan_note(a: Path, b: Path) -> str | None:
    """Why no bound or rounding floor is printed, where that is not plain; None otherwise."""
    unknown = next((d for d in (a, b) if _unknown_why(d)), None)
    if unknown is not None:
        return (f"{unknown}'s merges are not known ({_unknown_why(unknown)}): 'rank' may count the rounding of "
                "a bf16 base at each merge")
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
        if plan is not None and name.removesuffix(".weight") in plan["layers"]:  # a ReLoRA layer (others: full rank)
            # each rounding moves a weight by at most half its step: the spectrum's edge at that variance
            variance = sum(n * rounding_step(wb, dtype).pow(2).mean() / 4 for n, dtype in plan["roundings"])
            floor = float(variance) ** 0.5 * (wa.shape[0] ** 0.5 + wa.shape[1] ** 0.5)
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
    for kind, recs in groups.items():  # a kind's bound and rounding: where all its layers are ReLoRA layers
        out[kind] = {"layers": len(recs), "shape": recs[0]["shape"],
                     **{key: sum(r[key] for r in recs) / len(recs) for key in
                        ("rank", "effective_rank", "rel_norm", "above_rounding") if all(key in r for r in recs)}}
        if all("bound" in r for r in recs):
            out[kind]["bound"] = recs[0]["bound"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("a", type=user_path, help="the earlier Hugging Face directory (e.g. the warm start's export)")
    ap.add_argument("b", type=user_path, help="the later one")
    ap.add_argument("--threshold", type=float, default=0.01,
                    help="a singular value counts toward `rank` above this fraction of the largest (default 0.01)")
    ap.add_argument("--per-layer", action="store_true", help="a row per weight matrix, not per layer kind")
    ap.add_argument("--all", action="store_true", help="include the embeddings and lm_head")
    ap.add_argument("--json", type=user_path, help="also write every matrix's numbers here")
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 1:
        ap.error(f"--threshold {args.threshold} must be in (0, 1)")
    for d in (args.a, args.b):
        if not d.is_dir():
            ap.error(f"{d} is not a directory (give two Hugging Face exports: launch/export.py)")
    if args.json is not None and args.json.is_dir():
        ap.error(f"--json {args.json} is a directory: give a file to write the numbers to")
    if args.json is not None:
        check_writable(ap, "--json", args.json)
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
        once = plan["base_dtype"] in ("bfloat16", "float16") and not plan["merge_residual"]
        print(f"warning: {len(over)} matrices (e.g. {over[0]}) have a rank above the {plan['bound']} the merges "
              f"between the exports can add (rank-r terms x r): the excess is rounding ({plan['base_dtype']} base, "
              "exports), full-rank and above the cut where |dW|/|W| is small. 'above rounding' counts past it"
              + ("; a run with --merge-residual rounds once in all" if once else ""), file=sys.stderr)
    elif plan_note(args.a, args.b):
        print(f"note: {plan_note(args.a, args.b)}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "threshold": args.threshold,
                                         "matrices": per_layer}, indent=1) + "\n")
    return per_layer


if __name__ == "__main__":
    tolerant_stdout()
    sys.exit(0 if main() is not None else 1)
