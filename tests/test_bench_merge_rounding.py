"""launch/bench_merge_rounding.py (README's numbers on what a bf16 or int8 base's rounding loses of ReLoRA
merges), at tiny sizes, against oracles computed here: the exact sum in float64 and one torch bf16 rounding of
it, and an int8 residual that holds an update rounded to its grid (scale/254) element by element."""
import json
import sys

import pytest
import torch

from kernel_utils import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import bench_merge_rounding as bmr  # noqa: E402
from relora_ds import quant  # noqa: E402

N, RANK = 64, 4


def _exact_sum(updates):
    return sum(s * (B.double() @ A.double()) for A, B, s in updates)


def test_bf16_one_merge_loses_its_rounding_and_merge_residual_keeps_a_stream_one_rounding_away():
    for rho in (1e-4, 0.08):
        W0, ups = quant.realistic_updates(N, N, RANK, 30, rel_norm=rho, seed=1)
        W0 = W0.bfloat16().float()
        one = bmr.run_stream(bmr.make_layer(W0, RANK, "bf16"), W0, ups[:1], {1})[0]
        dW = _exact_sum(ups[:1])
        rounded = (W0.double() + dW).bfloat16().double() - W0.double()  # what a bf16 weight can take of ΔW
        assert one["update_rel"] == pytest.approx(rho, rel=0.01)
        assert one["lost"] == pytest.approx(((rounded - dW).norm() / dW.norm()).item(), rel=0.01), rho
        for stream, stream_ups in bmr.streams(ups, 30).items():
            total = _exact_sum(stream_ups)
            exact = W0.double() + total
            one_rounding = ((exact.bfloat16().double() - exact).norm() / total.norm()).item()
            plain, fed = (bmr.run_stream(bmr.make_layer(W0, RANK, base), W0, stream_ups, {30})[0]
                          for base in ("bf16", "bf16_residual"))
            assert fed["lost"] <= 1.05 * one_rounding and fed["error"] <= 1.05, (rho, stream, fed, one_rounding)
            if rho > 0.01:  # without the residual each merge's rounding adds up
                assert plain["error"] > 2.0, (rho, stream, plain)
            else:  # far below bf16's rounding almost all of every merge is lost
                assert one["lost"] > 0.9 and plain["lost"] > 0.9, (one, plain)


def test_int8_merges_are_scaled_to_residual_steps_and_round_to_the_residual_grid():
    W0, ups = quant.realistic_updates(N, N, RANK, 1, seed=2)
    for x in (0.3, 1.0, 2.0):
        layer = bmr.make_layer(W0, RANK, "int8")
        step = layer.weight_scale.double() / 254
        (A, B, s), = bmr.rescaled_to_steps(layer, ups, x)
        u = s * (B.double() @ A.double())
        assert torch.allclose(u.square().mean(1).sqrt(), x * step, rtol=1e-4)
        held_change = torch.round(u / step[:, None]) * step[:, None]  # the residual is on its grid before the merge
        row = bmr.run_stream(layer, W0, [(A, B, s)], {1})[0]
        assert row["lost"] == pytest.approx(((held_change - u).norm() / u.norm()).item(), rel=0.02), x


def test_int8_residual_stays_at_the_one_shot_error_unless_the_same_rounding_repeats():
    rows = bmr.int8_rows([], n=N, rank=RANK, steps=(0.1, 1.0), merges=(200,), seed=3)
    get = {(r["stream"], r["steps"]): r for r in rows if r["k"] == 200}
    assert get[("independent", 1.0)]["error"] <= 1.01 and get[("independent", 0.1)]["error"] <= 1.01
    assert get[("independent", 0.1)]["lost"] > 0.95  # a tenth of a residual step rounds away
    assert get[("repeated", 1.0)]["error"] > 1.1  # a constant drift's rounding error adds up element by element


def test_main_writes_stamped_rows_and_prints_both_tables(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bmr.main(["--n", "32", "--rank", "2", "--ratios", "0.01", "--bf16-merges", "3", "--steps", "1",
              "--int8-merges", "2", "--out", str(out)])
    rows = json.loads(out.read_text())
    kinds = {(r["op"], r.get("base"), r.get("stream"), r.get("k")) for r in rows}
    assert kinds == {("bf16_rounding", None, None, None)} | {
        ("merge_rounding", b, s, k) for b, ks in (("bf16", (1, 3)), ("bf16_residual", (1, 3)), ("int8", (1, 2)))
        for s in bmr.STREAMS for k in ks}
    assert all({"device", "torch", "date"} <= set(r) for r in rows)
    text = capsys.readouterr().out
    assert "| 0.01 | 0.0100 | independent |" in text and "| 1 | repeated |" in text
    with pytest.raises(SystemExit):
        bmr.main(["--rank", "600", "--out", str(out)])
