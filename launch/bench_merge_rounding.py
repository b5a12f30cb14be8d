"""What a base weight's rounding loses from a stream of ReLoRA merges: a bf16 base, plain and with
``merge_residual`` (error feedback), and an int8 base (its int8 residual). Measured through the layer's own
merge (``ReLoRALinear.merge_``: the torch path on CPU), against the merges' exact sum in float64.

Setup: W0 (n×n, LLaMA init σ=0.02) and rank-r updates ΔW_k = s·B_k·A_k (A Kaiming-uniform, B Gaussian, from
quant.realistic_updates), merged one at a time by ``layer.merge_(A_k, B_k)``; ΣΔW is summed in float64 from
the same fp32 factors. Two kinds of stream:
  independent  a fresh draw per merge (ReLoRA re-draws A at every merge), so the roundings' errors add up
               like random noise;
  repeated     the first draw K times: a constant drift, the worst case, where each element's rounding error
               is the same at every merge and adds up linearly.

Quantities after k merges (k = 1: one merge):
  lost      ‖(H_k − H_0) − Σ_{j≤k} ΔW_j‖_F / ‖Σ_{j≤k} ΔW_j‖_F: the share of the merges' sum that the layer does not
            hold. H is what the layer carries into its next merge: a bf16 base's weight (with merge_residual the
            residual is left out: the forward and the exports use the weight alone), an int8 base's 16-bit value
            (q + residual/254)·scale.
  error     ‖W_k − W_exact‖_F / ‖Q(W_exact) − W_exact‖_F, W_exact = W0 + ΣΔW: the forward's weight (bf16, or
            int8 q·scale) as a multiple of quantizing the exact weight once (Q: bf16 rounding, or per-row absmax
            int8 with bf16 scales, relora_kernels.int8_quantize_reference).
  one_shot  ‖Q(W_exact) − W_exact‖_F / ‖ΣΔW‖_F: that one quantization as a share of the sum (bf16: the least
            error feedback can reach; lost = error · one_shot there).

Sections (``--sections``, default both):
  bf16  ‖ΔW_k‖_F = ρ·‖W0‖_F (``--ratios``); ``update_rel`` is the layer's own record of its first merge,
        ‖s·B·A‖_F / ‖W‖_F (merge_stats.update_norms, the metrics' update_rel). bf16 rounds to 8 significant
        bits: 2⁻⁹–2⁻⁸ of an element at most. Plain and ``merge_residual`` hold the same weight after one merge
        (the residual starts at 0 and keeps what the plain layer loses); they part over ``--bf16-merges``.
  int8  ``quantize="int8"``. A merge of x residual steps (``--steps``): s·B·A rescaled row by row to an RMS of
        x·scale_i/254 per element in row i (scale_i: row i's int8 step before the stream; scale/254 is the
        residual's step, and a merge rounds each element to it: up to scale/508). Checkpoints
        ``--int8-merges`` (the stream runs to the largest).

    python launch/bench_merge_rounding.py      # both sections, 512x512, r=32: 45 s on 1 CPU core
Rows are appended to --out (CSV or .json) as they are made, through bench_common.RowSink.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from bench_common import RowSink  # noqa: E402
from cli_types import DefaultsHelpFormatter, positive_float, positive_int  # noqa: E402

import relora_kernels as rk  # noqa: E402
from relora_kernels.int8_reference import RES_STEPS  # noqa: E402
from relora_ds import quant  # noqa: E402
from relora_ds.relora import DEFAULT_ALPHA, ReLoRALinear  # noqa: E402

RATIOS = (0.001, 0.0027, 0.005, 0.01, 0.02, 0.04, 0.08)
STEPS = (0.1, 0.3, 0.5, 1.0, 2.0)
STREAMS = ("independent", "repeated")


def make_layer(W0: torch.Tensor, rank: int, base: str) -> ReLoRALinear:
    """A fresh layer over W0 (out, in): base ``bf16``, ``bf16_residual`` (merge_residual) or ``int8``."""
    kw = dict(quantize="int8") if base == "int8" else dict(dtype=torch.bfloat16, merge_residual=base == "bf16_residual")
    layer = ReLoRALinear(W0.shape[1], W0.shape[0], rank, alpha=DEFAULT_ALPHA, init_base=False, **kw)
    layer.load_base_(W0)
    return layer


def held(layer: ReLoRALinear) -> torch.Tensor:
    """What the layer carries into its next merge, in float64 (exact for both bases)."""
    if layer.quantize:
        v = layer.weight_q.double() + layer.weight_residual.double() / RES_STEPS
        return v * layer.weight_scale.double()[:, None]
    return layer.weight.double()


def forward_weight(layer: ReLoRALinear) -> torch.Tensor:
    """The weight the forward uses, in float64 (an int8 base: q·scale, without the residual)."""
    return (layer.weight_q.double() * layer.weight_scale.double()[:, None]) if layer.quantize else layer.weight.double()


def quantized_once(layer: ReLoRALinear, w: torch.Tensor) -> torch.Tensor:
    """One quantization of a float64 weight to the layer's base format, back in float64."""
    if layer.quantize:
        q, scale, _ = rk.int8_quantize_reference(w.float())
        return q.double() * scale.double()[:, None]
    return w.to(layer.weight.dtype).double()


@torch.no_grad()
def run_stream(layer: ReLoRALinear, W0: torch.Tensor, updates, checkpoints) -> list[dict]:
    """Merges ``updates`` ((A, B, s) each) into ``layer`` one at a time; a row (k, update_rel, lost, error,
    one_shot; see the module's docstring) at each k in ``checkpoints``. W0: the float weight loaded."""
    H0, total = held(layer), torch.zeros(W0.shape, dtype=torch.float64)
    rows = []
    for k, (A, B, s) in enumerate(updates, 1):
        assert s == layer.scale, (s, layer.scale)
        layer.merge_(A, B)
        if k == 1:
            delta_norm, w_norm = layer.last_update_norms
            update_rel = delta_norm / w_norm
        total += s * (B.double() @ A.double())
        if k in checkpoints:
            exact = W0.double() + total
            once = quantized_once(layer, exact)
            rows.append(dict(k=k, update_rel=update_rel,
                             lost=((held(layer) - H0 - total).norm() / total.norm()).item(),
                             error=((forward_weight(layer) - exact).norm() / (once - exact).norm()).item(),
                             one_shot=((once - exact).norm() / total.norm()).item()))
    return rows


def streams(updates, merges: int) -> dict:
    return {"independent": updates[:merges], "repeated": updates[:1] * merges}


def bf16_rows(rows, n=512, rank=32, ratios=RATIOS, merges=20, seed=0) -> list[dict]:
    """The bf16 section's rows (appended to ``rows`` as they are made), and its table printed."""
    made = []
    W0 = quant.realistic_updates(n, n, rank, 0, seed=seed)[0]
    rounding = ((W0.bfloat16().float() - W0).norm() / W0.norm()).item()  # the "bf16 rounding" of a matrix, for ρ
    rows.append(dict(op="bf16_rounding", n=n, rel=rounding))
    for rho in ratios:
        W0, updates = quant.realistic_updates(n, n, rank, merges, rel_norm=rho, seed=seed)
        W0 = W0.bfloat16().float()  # the bf16 base, exactly
        for stream, ups in streams(updates, merges).items():
            for base in ("bf16", "bf16_residual"):
                for r in run_stream(make_layer(W0, rank, base), W0, ups, {1, merges}):
                    made.append(dict(op="merge_rounding", base=base, stream=stream, rho=rho, n=n, r=rank, **r))
                    rows.append(made[-1])
    get = {(r["base"], r["stream"], r["rho"], r["k"]): r for r in made}
    print(f"\nbf16 base ({n}x{n}, rank {rank}; one bf16 rounding of W0 moves it by {rounding:.5f}·‖W0‖_F): lost = "
          f"share of the merges' sum not in the weight; error = ‖W − W_exact‖ / one rounding's, after {merges} merges")
    print(f"| ρ | update_rel (layer) | stream | lost, 1 merge | lost, {merges}: plain | with merge_residual "
          f"| one rounding of W_exact | error, {merges}: plain | with merge_residual |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rho in ratios:
        for stream in STREAMS:
            one, plain, fed = (get[(b, stream, rho, k)] for b, k in
                               (("bf16", 1), ("bf16", merges), ("bf16_residual", merges)))
            print(f"| {rho:g} | {one['update_rel']:.4f} | {stream} | {one['lost']:.3f} | {plain['lost']:.3f} | "
                  f"{fed['lost']:.4f} | {plain['one_shot']:.4f} | {plain['error']:.2f} | {fed['error']:.3f} |")
    return made


def rescaled_to_steps(layer: ReLoRALinear, updates, x: float):
    """``updates`` with each B's rows rescaled so that s·B·A has an RMS of x residual steps (x·scale_i/254)
    per element in each row i (the layer's scales now)."""
    step = layer.weight_scale.double() / RES_STEPS  # (out,)
    out = []
    for A, B, s in updates:
        A64, B64 = A.double(), B.double()
        rms = s * ((B64 @ (A64 @ A64.T)) * B64).sum(1).sqrt() / A.shape[1] ** 0.5  # (out,): ‖row of s·B·A‖/√in
        out.append((A, (B64 * (x * step / rms)[:, None]).float(), s))
    return out


def int8_rows(rows, n=512, rank=32, steps=STEPS, merges=(20, 1000), seed=0) -> list[dict]:
    """The int8 section's rows (appended to ``rows`` as they are made), and its table printed."""
    K = max(merges)
    W0, updates = quant.realistic_updates(n, n, rank, K, seed=seed)
    made = []
    for x in steps:
        scaled = rescaled_to_steps(make_layer(W0, rank, "int8"), updates, x)
        for stream, ups in streams(scaled, K).items():
            for r in run_stream(make_layer(W0, rank, "int8"), W0, ups, {1, *merges}):
                made.append(dict(op="merge_rounding", base="int8", stream=stream, steps=x, n=n, r=rank, **r))
                rows.append(made[-1])
        del scaled
    get = {(r["stream"], r["steps"], r["k"]): r for r in made}
    ks = sorted(merges)
    print(f"\nint8 base ({n}x{n}, rank {rank}), merges of x residual steps (RMS per element, scale/254 each): lost = "
          "share of the merges' sum not in (q + residual/254)·scale; error = ‖q·scale − W_exact‖ / one-shot's")
    print("| x | stream | lost, 1 merge | " + " | ".join(f"lost, {k}" for k in ks) + " | "
          + " | ".join(f"error, {k}" for k in ks) + " |")
    print("|---|---|---|" + "---|" * (2 * len(ks)))
    for x in steps:
        for stream in STREAMS:
            print(f"| {x:g} | {stream} | {get[(stream, x, 1)]['lost']:.3f} | "
                  + " | ".join(f"{get[(stream, x, k)]['lost']:.3f}" for k in ks) + " | "
                  + " | ".join(f"{get[(stream, x, k)]['error']:.4f}" for k in ks) + " |")
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["bf16", "int8"], choices=("bf16", "int8"))
    ap.add_argument("--n", type=positive_int, default=512, help="W0 is n x n (default: 512)")
    ap.add_argument("--rank", type=positive_int, default=32, help="rank of each update (default: 32)")
    ap.add_argument("--ratios", nargs="+", type=positive_float, default=list(RATIOS),
                    help="bf16: ‖ΔW‖/‖W0‖ per merge")
    ap.add_argument("--bf16-merges", type=positive_int, default=20, help="bf16: merges per stream (default: 20)")
    ap.add_argument("--steps", nargs="+", type=positive_float, default=list(STEPS),
                    help="int8: residual steps per merge (RMS)")
    ap.add_argument("--int8-merges", nargs="+", type=positive_int, default=[20, 1000],
                    help="int8: checkpoints k (default: 20 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_merge_rounding.json")
    args = ap.parse_args(argv)
    if args.rank > args.n:
        ap.error(f"--rank={args.rank} must be at most --n={args.n}")
    rows = RowSink(args.out, dict(device="cpu", torch=torch.__version__, date=datetime.date.today().isoformat()))
    if "bf16" in args.sections:
        bf16_rows(rows, args.n, args.rank, args.ratios, args.bf16_merges, args.seed)
    if "int8" in args.sections:
        int8_rows(rows, args.n, args.rank, args.steps, args.int8_merges, args.seed)


if __name__ == "__main__":
    main()
