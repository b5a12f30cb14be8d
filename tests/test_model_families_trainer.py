"""The trainer on Hugging Face checkpoints of the families tests/test_model_families.py checks against
transformers: a tied LLaMA-3.2-style model trained, exported (transformers loads the export as the source's
class and gives our checkpoint's logits), resumed bit for bit, on ZeRO-3 with a universal resume, and tied
Qwen2/Qwen3 models training their biases and norms."""
import json

import pytest
import torch
import transformers

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from test_model_families import _hf_dir, _logits


def _export_equals_the_checkpoints_model(run_dir, source):
    """The trainer's export (hf/), loaded by transformers as the source's class, gives the logits of our model
    rebuilt from the last checkpoint (ReLoRA layers unmerged); the tie held, and training moved the shared
    weight, the biases and Qwen3's q/k norms away from the source's."""
    from relora_ds import checkpoint

    saved = checkpoint.load_config(run_dir / "checkpoints", "step_12")
    state = checkpoint.full_state_dict(run_dir / "checkpoints", "step_12")
    ours = LlamaForCausalLM(LlamaConfig(**saved["model"]))
    relora_ds.wrap(ours, rank=saved["train"]["rank"], alpha=saved["train"]["alpha"])
    ours.load_state_dict(state)
    exported = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert type(exported) is type(start) and exported.lm_head.weight is exported.model.embed_tokens.weight
    x = torch.randint(0, 512, (2, 33))
    torch.testing.assert_close(_logits(exported, x), _logits(ours.eval(), x), atol=1e-5, rtol=0)
    moved = {n: (p - start.state_dict()[n]).abs().max().item() for n, p in exported.state_dict().items()
             if n == "model.embed_tokens.weight" or n.endswith((".bias", "q_norm.weight", "k_norm.weight"))}
    assert moved and all(m > 1e-3 for m in moved.values()), moved


@pytest.fixture(scope="module")
def tied_llama_run(tmp_path_factory, small_data_dir):
    """One rank, ZeRO-2, from a tied LLaMA-3.2-style checkpoint with llama3 RoPE; checkpoints at 6 and 12."""
    from trainer_utils import read_losses, train1

    tmp = tmp_path_factory.mktemp("tied_llama")
    source = _hf_dir(tmp, "llama3.2-tied")
    train1(tmp, small_data_dir, hf_model=source, save_every=6, export=True)
    return {"tmp": tmp, "source": source, "losses": read_losses(tmp / "run")[0]}


def test_trainer_on_a_tied_llama_exports_what_it_trained(tied_llama_run):
    run = tied_llama_run["tmp"] / "run"
    assert sorted(tied_llama_run["losses"]) == list(range(1, 13))
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(l).get("event") == "reset"] == [6, 10]
    _export_equals_the_checkpoints_model(run, tied_llama_run["source"])


def test_trainer_on_a_tied_llama_resumes_bit_for_bit(tmp_path, small_data_dir, tied_llama_run):
    """Rewound to its step-6 checkpoint (right after the first reset), the tied run continues its own losses
    exactly (ZeRO-2, one rank)."""
    import shutil

    from trainer_utils import read_losses, rewind_to, train1

    shutil.copytree(tied_llama_run["tmp"] / "run", tmp_path / "run")
    rewind_to(tmp_path / "run", "step_6")
    train1(tmp_path, small_data_dir, "--resume", hf_model=tied_llama_run["source"], save_every=6)
    resumed, reference = read_losses(tmp_path / "run")[0], tied_llama_run["losses"]
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)


def test_a_resume_reads_no_weights_from_the_hugging_face_directory(tmp_path, small_data_dir):
    """Without a warm start the ReLoRA model is built at once from hf_model, int8 base included; a resume
    takes every weight from its checkpoint, so it continues the run bit for bit with the directory's weights
    gone (before, it read them again first: minutes at 7b, at every requeue); config.json still gives the
    architecture."""
    from trainer_utils import read_losses, rewind_to, train1

    source = _hf_dir(tmp_path, "llama3.2-tied")
    kw = dict(hf_model=source, warm_start_steps=0, quantize="int8", save_every=6)
    train1(tmp_path, small_data_dir, **kw)
    reference = read_losses(tmp_path / "run")[0]
    rewind_to(tmp_path / "run", "step_6")
    weights = list((tmp_path / "llama3.2-tied").glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(b"not weights any more")
    train1(tmp_path, small_data_dir, "--resume", **kw)
    resumed = read_losses(tmp_path / "run")[0]
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)


def test_trainer_on_a_tied_llama_zero3_two_ranks_and_universal_resume(tmp_path, small_data_dir, tied_llama_run):
    """ZeRO-3 on two ranks (lm_head gathers the embedding's partitions for the loss) trains the one-rank run's
    losses up to reduction order; its step-7 checkpoint resumed on one rank goes through DeepSpeed's universal
    checkpoint, where the shared weight has one name, and continues them."""
    from launch_utils import ROOT, run_ranks
    from trainer_utils import FP32_ZERO2, read_losses, rewind_to, train1, write

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": 3}}))
    kw = dict(hf_model=tied_llama_run["source"], save_every=7)
    recipe, _ = write(tmp_path, small_data_dir, **kw)
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    two, one = read_losses(tmp_path / "run")[0], tied_llama_run["losses"]
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-5, abs=2e-5), step
    rewind_to(tmp_path / "run", "step_7")
    proc = train1(tmp_path, small_data_dir, "--resume", ds=ds, **kw)
    assert "loading it as a DeepSpeed universal checkpoint" in proc.stdout + proc.stderr
    resumed = read_losses(tmp_path / "run")[0]
    assert sorted(resumed) == list(range(8, 13))
    for step in resumed:
        assert resumed[step] == pytest.approx(two[step], rel=2e-5, abs=2e-5), step


@pytest.mark.parametrize("family", ["qwen2-tied", "qwen3-tied"])
def test_trainer_on_a_tied_qwen_trains_its_biases_and_norms_and_exports_its_class(tmp_path, small_data_dir, family):
    from trainer_utils import train1

    source = _hf_dir(tmp_path, family)
    train1(tmp_path, small_data_dir, hf_model=source, export=True)
    _export_equals_the_checkpoints_model(tmp_path / "run", source)
