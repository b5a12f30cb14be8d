"""int8 base weights under DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with host offload (bf16, 2 CPU ranks):
ZeRO-3 partitions the int8 weight; resets keep the base bit-identical across ranks and equal to the
single-process reference; checkpoints restore it exactly."""
import json

import pytest

from launch_utils import ROOT, run_ranks

STAGES = ("2", "3", "3off")  # 3off: ZeRO-3 with the optimizer and the parameters offloaded to the host


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_zero")
    run_ranks(ROOT / "tests/dist/int8_worker.py", "--out", out, "--stages", ",".join(STAGES))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("stage", STAGES)
def test_int8_storage_survives_bf16_engine(results, stage):
    for res in results:
        r = res[f"zero{stage}"]
        assert r["dtypes"] == ["torch.bfloat16", "torch.int8"]  # int8 q/residual, bf16 scales: not recast
        assert r["residual_on_host"] and r["no_weight_param"] and not r["int8_in_optimizer"]
        assert r["lora_dtype"] == "torch.bfloat16"
        assert r["offloaded"] == ("optimizer+parameters" if stage == "3off" else "none")
        if stage.startswith("3"):  # the int8 weight is partitioned like a bf16 base: each rank holds half of it
            assert len(r["partitioned"]) == len(r["q_numel"]) == 14
            assert all(part == -(-n // 2) for part, n in zip(r["partitioned"], r["q_numel"]))


@pytest.mark.parametrize("stage", STAGES)
def test_int8_merges_identical_on_ranks_and_match_reference(results, stage):
    r0, r1 = (res[f"zero{stage}"] for res in results)
    for key in ("hash_after_merge_1", "hash_after_merge_2", "hash_after_resume_merge"):
        assert r0[key] == r1[key], key
    assert r0["hash_after_merge_1"] != r0["hash_after_merge_2"]
    assert r0["merges_match_reference"] and r1["merges_match_reference"]
    assert r0["merge_count"] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_int8_checkpoint_resume_exact(results, stage):
    for res in results:
        r = res[f"zero{stage}"]
        assert r["fresh_differs"], "a fresh engine already equals the trained buffers: the check is vacuous"
        assert r["resume_exact"] and r["resume_counts"] and r["resume_residual_on_host"]
