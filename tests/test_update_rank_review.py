"""launch/update_rank.py on exports whose relora_ds_progress.json an older relora_ds wrote (git log -p
relora_ds/hf.py relora_ds/resume.py): from 2026-12-04 (fc6bcc1) a run's exports recorded step, tokens, sampler,
seed and data, and no merges in either phase; from 2026-12-05 08:59 (aa02ef8) a merge record naming the layers'
``kinds`` and the export copy's dtype; from 10:01 (943e23b) the ReLoRA ``layers`` by name. Oracle: 3 then 2
merges of random rank-2 factors in float64 (by hand: the update between the exports has rank 2 x 2 = 4, and
the bound from the current records is 4); the old files are written as those commits wrote them."""
import json
import shutil
import sys

import torch
from launch_utils import ROOT, launch_env, run_python

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.relora import relora_layers

sys.path.insert(0, str(ROOT / "launch"))
import update_rank  # noqa: E402

IDS = {"bos_token_id": 1, "eos_token_id": 2}
# what the trainer's progress() holds (relora_ds/resume.py); fc6bcc1's had the first five keys alone
PROGRESS = {"tokens_seen": 0, "sampler": {"epoch": 0, "position": 0}, "seed": 0, "data": {}}


def _exports(tmp_path):
    """A after 3 merges, B after 2 more: a run's two ReLoRA-phase exports in today's format."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    model = relora_ds.wrap(LlamaForCausalLM(cfg).double(), rank=2, alpha=4)
    for name, merges in (("a", 3), ("b", 2)):
        for _ in range(merges):
            for _, layer in relora_layers(model):
                torch.nn.init.normal_(layer.lora_B, std=0.1)
            relora_ds.merge_and_reinit(model)
        relora_ds.export_hf(model, tmp_path / name, token_ids=IDS, dtype=torch.float64,
                            progress={"step": 3 if name == "a" else 5, **PROGRESS, "document_masking": False})
    return tmp_path / "a", tmp_path / "b"


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    path = dst / "relora_ds_progress.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return dst


def _before_merge_records(progress):  # fc6bcc1 to aa02ef8
    return {k: progress[k] for k in ("step", "tokens_seen", "sampler", "seed", "data")}


def _first_merge_record(progress):  # aa02ef8 to 943e23b
    record = dict(progress["relora"])
    record["kinds"] = sorted({name.rpartition(".")[2] for name in record.pop("layers")})
    return {**_before_merge_records(progress), "relora": record}


def test_todays_records_give_the_bound_by_hand(tmp_path):
    a, b = _exports(tmp_path)
    assert {(r["rank"], r["bound"]) for r in update_rank.compare(a, b).values()} == {(4, 4)}


def test_a_relora_export_from_before_merge_records_is_not_taken_for_a_full_rank_one(tmp_path):
    """A, a ReLoRA export of 2026-12-04, records no merges: read as the warm start's export (no ReLoRA layers),
    the bound counted all 5 of B's merges, 10 where 4 is right, and the rounding of 6 merges. Its merges are
    unknown: the rank as measured, no bound, and a note that says why."""
    a, b = _exports(tmp_path)
    old = _rewrite(a, tmp_path / "a_old", _before_merge_records)
    per_layer = update_rank.compare(old, b)
    assert {r["rank"] for r in per_layer.values()} == {4}
    assert all("bound" not in r and "above_rounding" not in r for r in per_layer.values()), per_layer
    proc = run_python(ROOT / "launch/update_rank.py", old, b, env=launch_env(), check=True)
    assert f"note: {old}'s merges are not known (its relora_ds_progress.json is from before 2026-12-05" in proc.stderr


def test_an_export_with_the_first_merge_record_is_compared_without_a_traceback(tmp_path):
    """B's record names the layers' kinds, not the layers (aa02ef8): the command failed with KeyError 'layers'.
    The ranks as measured, no bound, and a note."""
    a, b = _exports(tmp_path)
    old = _rewrite(b, tmp_path / "b_old", _first_merge_record)
    per_layer = update_rank.compare(a, old)
    assert {r["rank"] for r in per_layer.values()} == {4} and all("bound" not in r for r in per_layer.values())
    proc = run_python(ROOT / "launch/update_rank.py", a, old, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"note: {old}'s merges are not known (its relora_ds_progress.json is from 2026-12-05's first" in proc.stderr
    q = next(line.split() for line in proc.stdout.splitlines() if line.startswith("q_proj"))
    assert q[:3] == ["q_proj", "32x32", "4.0"], q


def test_a_full_rank_export_of_today_still_counts_as_one(tmp_path):
    """The warm start's export (no ReLoRA layers: no merge record, but document_masking) stays a known
    full-rank start: the bound counts B's 5 merges, rank 2 x 5 = 10, by hand."""
    a, b = _exports(tmp_path)
    full = _rewrite(a, tmp_path / "full", lambda p: {k: v for k, v in p.items() if k != "relora"})
    assert update_rank.rounding_plan(full, b)["bound"] == 10
