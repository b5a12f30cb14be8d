"""ReLoRA inside Hugging Face's Trainer (relora_ds/hf_trainer.py): against a hand-written loop over the
package's own API (the oracle), and a 2-rank DeepSpeed ZeRO-2 Trainer run against a one-process one."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

import relora_ds
from launch_utils import ROOT, free_port, run_ranks

sys.path.insert(0, str(ROOT / "tests" / "dist"))
import hf_trainer_worker as w  # noqa: E402


def hand_loop(batch, kind="llama"):
    """What the Trainer run must do, written out with relora_ds's API: AdamW, the jagged cosine, clipping,
    and after every third step a merge, re-init and prune (seed = args.seed + step)."""
    model = w.model(kind)
    data = w.Windows()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=w.HP["learning_rate"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = relora_ds.build_scheduler(opt, "jagged_cosine", total_steps=w.HP["max_steps"],
                                      warmup_steps=w.HP["warmup_steps"], **w.RELORA)
    losses, lrs = [], []
    for step in range(1, w.HP["max_steps"] + 1):
        ids = torch.stack([data[i]["input_ids"] for i in range((step - 1) * batch, step * batch)])
        lrs.append(sched.get_last_lr()[0])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, w.HP["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % w.RELORA["cycle_length"] == 0:
            relora_ds.merge_and_reinit(model)
            relora_ds.prune_optimizer_state(opt, relora_ds.lora_parameters(model), seed=w.HP["seed"] + step)
    return model, losses, lrs, opt


# transformers 4.x logs the loss rounded to 4 decimals (5.x logs it whole): up to 5e-5 off the hand loop's
LOSS_ABS = 6e-5 if int(transformers.__version__.split(".")[0]) < 5 else 1e-5


def logged(trainer_log, key):
    return [r[key] for r in trainer_log if key in r and "train_runtime" not in r]


def assert_same_weights(got: dict, want: dict, rtol):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, (k, got[k].shape)
        err = (got[k].double() - want[k].double()).norm() / max(want[k].double().norm(), 1e-12)
        assert err <= rtol, (k, float(err))


def without_key_bias(state: dict, kind: str) -> dict:
    """GPT-2's fused c_attn bias without its key part: softmax ignores a shift of all scores, so that bias gets
    no gradient but rounding noise, which Adam scales to full lr-sized steps in either direction; two ranks'
    summation order and one process's then disagree there, and only there (checked: indices n_embd..2n_embd)."""
    if kind != "gpt2":
        return state
    n = w.HIDDEN
    return {k: torch.cat([v[:n], v[2 * n:]]) if k.endswith("attn.c_attn.bias") else v for k, v in state.items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainer_resets_as_the_hand_written_loop(tmp_path, kind):
    trainer, callback = w.run(tmp_path, batch=4, kind=kind)
    oracle, losses, lrs, opt = hand_loop(batch=4, kind=kind)
    assert [(e["step"], e["event"]) for e in callback.events] == [(3, "reset"), (6, "reset")]
    assert logged(trainer.state.log_history, "loss") == pytest.approx(losses, rel=1e-5, abs=LOSS_ABS)
    # The jagged cosine: 0 at the first step and at the step after each reset, the cosine elsewhere.
    assert logged(trainer.state.log_history, "learning_rate") == pytest.approx(lrs, rel=1e-6)
    assert lrs[0] == lrs[3] == lrs[6] == 0.0 and min(lrs[1], lrs[4]) > 0
    assert_same_weights(trainer.model.state_dict(), oracle.state_dict(), rtol=1e-5)
    # Each layer merged twice (its merge_count buffer), and the LoRA moments were pruned at each reset: Adam's
    # state after step 7 is the hand loop's (a moment left unpruned at step 6 would carry 0.9 of its old value).
    for _, layer in relora_ds.relora_layers(trainer.model):
        assert int(layer.merge_count) == 2
    state = getattr(trainer.optimizer, "optimizer", trainer.optimizer).state
    mine = dict(trainer.model.named_parameters())
    lora = [(name, p) for name, p in oracle.named_parameters() if ".lora_" in name]
    assert lora and all(state[mine[name]]["exp_avg"].shape == p.shape for name, p in lora)
    assert_same_weights({f"{n}.{k}": state[mine[n]][k] for n, _ in lora for k in ("exp_avg", "exp_avg_sq")},
                        {f"{n}.{k}": opt.state[p][k] for n, p in lora for k in ("exp_avg", "exp_avg_sq")}, rtol=1e-4)
    # Without ReLoRA (no resets, a constant lr) the run ends elsewhere: the weight comparison is not vacuous.
    plain, _ = w.run(tmp_path / "plain", batch=4, relora=False, lr_scheduler_type="constant", kind=kind)
    moved = [(plain.model.state_dict()[k] - oracle.state_dict()[k]).abs().max() for k in oracle.state_dict()]
    assert max(moved) > 1e-3


def test_a_compiled_trainer_resets_as_the_hand_written_loop(tmp_path):
    """TrainingArguments(torch_compile=True): accelerate compiles the wrapped model; the merges and resets write
    its weights in place, so the run is still the hand-written loop's (eager), compiled as one graph with no
    break, and save_model writes the merged plain model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # AOTAutograd's graphs without inductor's code generation: what accelerate and the merges do is the same
    trainer, callback = w.run(tmp_path, batch=4, kind="llama", torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    oracle, losses, _, _ = hand_loop(batch=4, kind="llama")
    assert [(e["step"], e["event"]) for e in callback.events] == [(3, "reset"), (6, "reset")]
    assert logged(trainer.state.log_history, "loss") == pytest.approx(losses, rel=1e-5, abs=LOSS_ABS)
    assert_same_weights(trainer.model.state_dict(), oracle.state_dict(), rtol=1e-5)
    trainer.save_model(tmp_path / "merged")
    saved = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    want = relora_ds.unwrap(oracle).state_dict()
    assert_same_weights({k: v for k, v in saved.items() if k in want}, want, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("stage, kind", [(2, "llama"), (3, "llama"), (2, "gpt2")])
def test_two_rank_zero_trainer_equals_one_process(tmp_path, stage, kind):
    """DeepSpeed ZeRO-2 under the Trainer (HF's AdamW inside DeepSpeed's partitioned optimizer) and ZeRO-3 with
    DeepSpeed's own optimizer section (transformers then asks a copy of the trainer for that optimizer's
    schedule): the merge and prune run on the engine; two ranks of micro-batch 2 end where one process with
    batch 4 ends (a schedule other than the jagged cosine would not). At ZeRO-3 the model comes from
    from_pretrained, built partitioned (zero.Init) and wrapped so, as a model too large for one GPU is.
    GPT-2: its Conv1D projections, exported as Conv1D again, and two micro-batches of 1 per step (gradient
    accumulation). trainer.save_model writes the merged model, which transformers loads; at ZeRO-3 also before
    train(), when the partitioned model has no engine yet: the source's weights (B = 0), not the empty
    partitions it wrote (a review)."""
    extra = []
    if stage == 3:
        w.plain(kind).save_pretrained(tmp_path / "source")
        extra = ["--source", tmp_path / "source", "--save-before"]
    if kind == "gpt2":  # micro-batch 1, two per step: the merges after accumulation boundaries warn nothing
        extra = ["--grad-accum", 2]
    port = free_port()
    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--stage", stage, "--model", kind,
              *extra, timeout=600, master_port=port)
    # DeepSpeed's CPU shared-memory segments (relora_ds/shm_comm.py): the callback released them at train begin
    # (a mutation trial's survivor: without that release each rank left 66 MiB in /dev/shm)
    assert not list(Path("/dev/shm").glob(f"*allreduce_buffer_*_{port}_*"))
    got = json.loads((tmp_path / "run.json").read_text())
    assert [(e["step"], e["event"]) for e in got["events"]] == [(3, "reset"), (6, "reset")]
    trainer, _ = w.run(tmp_path / "one", batch=4, kind=kind)
    want = logged(trainer.state.log_history, "loss")
    assert logged(got["log"], "loss") == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert_same_weights(*(without_key_bias(sd, kind) for sd in (torch.load(tmp_path / "state.pt"),
                                                                 trainer.model.state_dict())), rtol=1e-4)
    # trainer.save_model under DeepSpeed (export_hf(engine): model_from_engine, unwrap, save_pretrained): a
    # plain transformers checkpoint whose logits are the trained model's.
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(exported) is type(trainer.model)
    assert not any("lora" in k for k in exported.state_dict())
    x = torch.stack([w.Windows()[i]["input_ids"] for i in range(3)])
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=x).logits
        got = exported.eval()(input_ids=x).logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max(), float((got - want).abs().max())
    if stage == 3:
        from safetensors.torch import load_file
        source = load_file(str(tmp_path / "source" / "model.safetensors"))
        before = load_file(str(tmp_path / "before" / "model.safetensors"))
        assert before.keys() == source.keys()
        for k in source:
            assert torch.equal(before[k], source[k]), k


def test_a_zero3_trainer_with_selective_checkpointing_resumes_where_it_left_off(tmp_path):
    """2 ranks, ZeRO-3 (DeepSpeed's default persistence threshold: the small weights persist), relora_ds's
    selective checkpointing policy on the transformers model, a Trainer checkpoint at step 4 (after the reset at 3)
    resumed to step 7: the same losses and the reset at 6. The resumed run failed at its first backward
    ("c10d._allgather_base_ ... not found in storage"): DeepSpeed's load leaves the persisting parameters
    gathered, so the first forward gathered fewer than its recompute, whose op counts the policy checks."""
    common = ["--stage", 3, "--selective", "--save-steps", 4]
    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path / "whole", *common, timeout=600)
    whole = json.loads((tmp_path / "whole" / "run.json").read_text())
    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path / "resumed", *common, "--resume",
              tmp_path / "whole" / "checkpoint-4", timeout=600)
    resumed = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert [(e["step"], e["event"]) for e in resumed["events"]] == [(6, "reset")]
    assert logged(resumed["log"], "loss") == pytest.approx(logged(whole["log"], "loss"), rel=1e-6, abs=1e-6)


def test_a_resumed_trainer_run_ends_where_the_uninterrupted_one_ends(tmp_path):
    """A Trainer checkpoint after the first reset (step 4) resumed to step 7: the second reset happens at step 6
    again, and the run ends with the uninterrupted one's weights (the re-initialized factors follow merge_count,
    a saved buffer; another schedule or moment would move the weights)."""
    whole, _ = w.run(tmp_path, batch=4, save_strategy="steps", save_steps=4)
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    args = TrainingArguments(**w.arguments(tmp_path / "resumed", batch=4))
    resumed = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(resumed, **w.RELORA)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [(e["step"], e["event"]) for e in callback.events] == [(6, "reset")]
    assert_same_weights(resumed.model.state_dict(), whole.model.state_dict(), rtol=1e-6)


@pytest.mark.parametrize("kind, quantize", [("llama", None), ("gpt2", "int8")])
def test_save_model_writes_the_merged_model_and_checkpoints_the_wrapped_state(tmp_path, kind, quantize):
    """trainer.save_model wrote the wrapped state, which from_pretrained loaded without s·B·A (an int8 base: not
    at all), saying so only in a load report (a review: logits off by 0.33 / 1.1). It now writes the merged
    model; the Trainer's checkpoints keep the wrapped state a resume needs. 5 steps: B != 0 at the end."""
    from transformers import AutoModelForCausalLM
    trainer, _ = w.run(tmp_path, batch=4, kind=kind, quantize=quantize, max_steps=5, save_strategy="steps",
                       save_steps=5)
    trainer.save_model(tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert not any("lora" in k or "weight_q" in k for k in loaded.state_dict())
    x = torch.stack([w.Windows()[i]["input_ids"] for i in range(3)])
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=x).logits
        assert any(layer.lora_B.abs().max() > 0 for _, layer in relora_ds.relora_layers(trainer.model))
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "checkpoint-5" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("lora_A") for k in f.keys())
    # README's recipe for a usable model from a checkpoint folder: wrap as in training, load its state (a tied
    # head is not stored: missing is only it), unwrap, save; the same logits as the trained model.
    from safetensors.torch import load_file
    net = w.model(kind, quantize=quantize)
    missing, unexpected = net.load_state_dict(load_file(tmp_path / "checkpoint-5" / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    relora_ds.unwrap(net).save_pretrained(tmp_path / "from_checkpoint")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "from_checkpoint").eval()(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_save_model_of_any_module_and_of_the_collators_tokenizer(tmp_path):
    """The Trainer takes any nn.Module: save_model wrote it with save_pretrained, which a plain module lacks
    (AttributeError; a review), and now writes model.safetensors as Trainer._save does, merged: the state of
    relora_ds.unwrap of the trained model. A tokenizer given only through the data collator is saved beside it,
    as Trainer._save saves it."""
    import copy

    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = w.plain()

        def forward(self, input_ids, labels=None):
            return self.lm(input_ids=input_ids, labels=labels)

    class Collate:  # carries its tokenizer, as DataCollatorWithPadding does
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, features):
            return transformers.default_data_collator(features)

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "fox": 1}, unk_token="[UNK]")))
    args = TrainingArguments(**{**w.arguments(tmp_path / "run", batch=4), "max_steps": 5})
    trainer = w.InOrder(model=relora_ds.wrap(Holder(), rank=4, seed=3), args=args, train_dataset=w.Windows(),
                        data_collator=Collate(tok))
    callback = enable_relora(trainer, **w.RELORA)
    trainer.train()
    assert [e["step"] for e in callback.events] == [3]
    trainer.save_model(tmp_path / "final")
    want = relora_ds.unwrap(copy.deepcopy(trainer.model)).state_dict()
    assert_same_weights(load_file(str(tmp_path / "final" / "model.safetensors")), want, rtol=1e-6)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "final")("fox")["input_ids"] == [1]


def test_a_resume_with_another_cycle_length_counts_from_the_checkpoints_last_reset(tmp_path):
    """The checkpoint of step 4 (cycles of 3: a reset at 3) resumed with cycle_length 2: the cycles count from the
    reset at 3, so the resets come at 5 and 7 and the schedule drops to 0 after each (hand-computed below);
    counted from step 0 they came at 6 only (at a lr the cycles of 3 had set). The scheduler's state, which the
    Trainer checkpoints, records where they count from for the next resume."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    w.run(tmp_path, batch=4, save_strategy="steps", save_steps=4)
    args = TrainingArguments(**w.arguments(tmp_path / "resumed", batch=4))
    resumed = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(resumed, **{**w.RELORA, "cycle_length": 2})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [(e["step"], e["event"]) for e in callback.events] == [(5, "reset"), (7, "reset")]
    fn = callback.scheduler.lr_lambdas[0]
    # LambdaLR's step i trains global step i + 1; the cosine from 1 to 0.1 over steps 1..7 (warmup 1)
    cos = lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * (i - 1) / 6))  # noqa: E731
    assert [fn(i) for i in (4, 5, 6)] == pytest.approx([cos(4), 0.0, cos(6)], abs=1e-12)
    assert callback.scheduler.state_dict()["lr_lambdas"][0]["relora_cycles"] == {
        "cycle_length": 2, "cycle_start": 3, "cycles_before": 1}


def test_a_resume_whose_shorter_cycle_has_already_ended_resets_at_once(tmp_path):
    """The checkpoint of step 5 (cycles of 3: a reset at 3) resumed with cycle_length 2: the new cycle from 3 ended
    at 5, before the checkpoint, so the overdue reset is done at train begin, at step 5, and the cycles count from
    there: resets at 5 and 7, the lr 0 at step 6 and 8 (hand-computed). Left at the reset at 3, step 6 trained at
    lr 0 with nothing merged or pruned behind it (a review), and the first reset came at 7. The merge at 5 is
    that of the plain run's checkpoint state: its A and B are the checkpoint's."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    w.run(tmp_path, batch=4, save_strategy="steps", save_steps=5)
    args = TrainingArguments(**w.arguments(tmp_path / "resumed", batch=4))
    resumed = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(resumed, **{**w.RELORA, "cycle_length": 2})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert [(e["step"], e["event"], e.get("overdue", False)) for e in callback.events] == [
        (5, "reset", True), (7, "reset", False)]
    assert all(e["layers"] > 0 and e["exp_avg_sq"] > 0.9 for e in callback.events), callback.events
    fn = callback.scheduler.lr_lambdas[0]
    cos = lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * (i - 1) / 6))  # noqa: E731
    assert [fn(i) for i in (5, 6)] == pytest.approx([0.0, cos(6)], abs=1e-12)
    assert callback.scheduler.state_dict()["lr_lambdas"][0]["relora_cycles"] == {
        "cycle_length": 2, "cycle_start": 5, "cycles_before": 2}


def test_the_lr_stays_on_the_step_when_the_scheduler_missed_one(tmp_path):
    """A step whose scheduler step did not run (what an fp16 overflow skip does: the optimizer step is skipped,
    global_step still counts it) shifted every later re-warm-up by one; a resume from a checkpoint without
    scheduler state (save_only_model=True) restarted the schedule at 0 (a review: the reset at step 6 came at
    the peak lr). The schedule is now put back on global_step; the lr of every step equals the plain run's."""
    from transformers import TrainerCallback, TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    whole, _ = w.run(tmp_path / "whole", batch=4)
    want = logged(whole.state.log_history, "learning_rate")

    class SkipOneSchedulerStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the second step: its scheduler step does not happen
                sched = skipped.lr_scheduler
                sched.step = lambda *a, **k: setattr(sched, "step", type(sched).step.__get__(sched))

    args = TrainingArguments(**w.arguments(tmp_path / "skip", batch=4))
    skipped = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows(), callbacks=[SkipOneSchedulerStep()])
    enable_relora(skipped, **w.RELORA)
    skipped.train()
    assert logged(skipped.state.log_history, "learning_rate")[2:] == pytest.approx(want[2:], rel=1e-6)

    w.run(tmp_path / "only_model", batch=4, save_strategy="steps", save_steps=4, save_only_model=True)
    args = TrainingArguments(**w.arguments(tmp_path / "resumed", batch=4))
    resumed = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(resumed, **w.RELORA)
    with pytest.warns(UserWarning, match="resumed at step 4 with the schedule at step 0"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "only_model" / "checkpoint-4"))
    assert [(e["step"], e["event"]) for e in callback.events] == [(6, "reset")]
    # (steps 1-4 logged by the first run, in the checkpoint's trainer state)
    assert logged(resumed.state.log_history, "learning_rate") == pytest.approx(want, rel=1e-6)


def test_a_tied_model_whose_head_is_not_lm_head_saves_merged(tmp_path):
    """merged_state_dict (the Trainer's save_model under enable_relora) deleted "lm_head.weight" from any tied
    model: BERT's tied head, cls.predictions.decoder, made it a KeyError at the end of training (a user trial,
    2026-12-05). The saved model reloads in transformers with the wrapped model's logits."""
    from transformers import BertConfig, BertForMaskedLM

    from relora_ds.hf import merged_state_dict

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = relora_ds.wrap(BertForMaskedLM(cfg), rank=4, target_modules="all-linear").eval()
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    x = torch.randint(0, 50, (2, 9))
    model.save_pretrained(tmp_path / "bert", state_dict=merged_state_dict(model))
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "bert").eval()
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_the_callback_takes_a_fractional_warmup_the_lr_floor_and_a_seed_per_reset(tmp_path, monkeypatch):
    """Mutations a trial ran that no test saw (the other runs use the defaults): warmup_steps=0.3 is a fraction
    of the run (TrainingArguments.get_warmup_steps: ceil(0.3 x 7) = 3 steps), min_lr_ratio=0.5 is the cosine's
    floor, and a 'random' prune draws each reset's masks from seed + step (the same seed would reuse a mask).
    The lr oracle: the jagged cosine over those settings, written out by hand."""
    import relora_ds.hf_trainer as hf_trainer

    seeds = []
    real = hf_trainer.prune_optimizer_state
    monkeypatch.setattr(hf_trainer, "prune_optimizer_state",
                        lambda *a, **kw: (seeds.append(kw["seed"]), real(*a, **kw))[1])
    trainer, callback = w.run(tmp_path, batch=4, warmup_steps=0.3,
                              relora_kw=dict(min_lr_ratio=0.5, prune_method="random"))
    assert [(e["step"], e["event"]) for e in callback.events] == [(3, "reset"), (6, "reset")]
    assert seeds == [w.HP["seed"] + 3, w.HP["seed"] + 6]

    def lr(step):  # 0-based scheduler step: warmup 3, then a cosine to 0.5 over steps 3..7, re-warmed 1 step
        cosine = 0.5 + 0.25 * (1 + math.cos(math.pi * (step - 3) / 4))
        if step < 3:
            return step / 3
        return 0.0 if step in (3, 6) else cosine
    lrs = logged(trainer.state.log_history, "learning_rate")
    assert lrs == pytest.approx([w.HP["learning_rate"] * lr(i) for i in range(7)], rel=1e-6, abs=1e-12)


def test_save_model_of_a_bf16_deepspeed_run_writes_bf16(tmp_path):
    """trainer.save_model under a bf16 DeepSpeed engine writes the merged model in bf16, as transformers saves a
    bf16 model (2 bytes a weight; a mutation passing no dtype wrote fp32 masters, twice the size, and no test
    trained in bf16 under DeepSpeed). One rank, ZeRO-2; the export loads in transformers as bf16 and holds the
    engine's weights: the last step follows the reset at step 6 at lr 0, so B = 0 and each merged weight is
    the fp32 master rounded once, which is the engine's own bf16 copy. save_model before train() (no engine
    yet: it read the engine's module and failed) writes the model as it is, B = 0: its base weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--bf16", "--save-before", nprocs=1,
              timeout=600)
    before = load_file(str(tmp_path / "before" / "model.safetensors"))
    assert not any("lora" in k for k in before) and len(before) == len(load_file(str(tmp_path / "hf" /
                                                                                    "model.safetensors")))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "before") is not None
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16} and not any("lora" in k for k in state)
    trained = torch.load(tmp_path / "state.pt")
    layers = [k.removesuffix(".lora_B") for k in trained if k.endswith(".lora_B")]
    assert len(layers) == 14
    for name in layers:
        assert not trained[f"{name}.lora_B"].any() and trained[f"{name}.lora_A"].any()
    assert set(state) <= set(trained)  # every exported weight: the engine's own bf16 copy
    for k in state:
        assert torch.equal(state[k], trained[k]), k
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype="auto").dtype == torch.bfloat16


def test_a_save_only_model_checkpoint_keeps_where_the_cycles_count_from(tmp_path):
    """Found by a review: where the cycles count from (moved by a resume with another cycle_length) was kept only
    in the scheduler's state, which save_only_model checkpoints lack: their resume counted the cycles from step 0
    again, resetting at other steps than the run it continues and dropping the lr to 0 with no reset behind it.
    The record is in trainer_state.json, which every checkpoint has. Oracle: the uninterrupted run (cycles of 4
    resumed at 6 with cycles of 3: from the reset at 4, resets at 7 and 10), resumed from its step-9
    save_only_model checkpoint: the reset at 10 and the lrs of steps 10-12 are the uninterrupted run's."""
    common = dict(batch=4, max_steps=12, logging_steps=1)
    # (save_steps 3 in both: a resumed TrainerState keeps the checkpoint's save_steps)
    w.run(tmp_path / "a", relora_kw={"cycle_length": 4}, save_strategy="steps", save_steps=3, **common)
    whole, callback = w.run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-6"),
                            relora_kw={"cycle_length": 3}, save_strategy="steps", save_steps=3, save_only_model=True,
                            **common)
    assert [(e["step"], e["event"]) for e in callback.events] == [(7, "reset"), (10, "reset")]
    saved = json.loads((tmp_path / "b" / "checkpoint-9" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["relora_ds_cycles"] == {"cycle_length": 3, "cycle_start": 4,
                                                               "cycles_before": 1}
    assert not (tmp_path / "b" / "checkpoint-9" / "scheduler.pt").exists()
    with pytest.warns(UserWarning, match="resumed at step 9 with the schedule at step 0"):
        resumed, callback = w.run(tmp_path / "c", resume=str(tmp_path / "b" / "checkpoint-9"),
                                  relora_kw={"cycle_length": 3}, **common)
    assert [(e["step"], e["event"]) for e in callback.events] == [(10, "reset")]
    def lrs(trainer):
        return {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}

    assert [lrs(resumed)[s] for s in (10, 11, 12)] == pytest.approx([lrs(whole)[s] for s in (10, 11, 12)], rel=1e-9)
    assert lrs(resumed)[11] == 0.0  # right after the reset at 10


def test_an_overdue_reset_on_a_checkpoint_without_optimizer_state_merges_and_prunes_nothing(tmp_path):
    """Found by a review: resuming a save_only_model checkpoint (no optimizer state: the moments start fresh, as
    warned) with a shorter cycle_length whose cycle had ended failed at train begin: the overdue reset asked
    the new optimizer for Adam moments it could not hold yet. The reset is done (merged; nothing to prune: the
    moments are the fresh zeros a prune leaves), and the cycles go on from it. Oracle: the schedule of resets
    (cycles of 4 saved at 7, the last reset at 4; cycles of 3: overdue at 7, then 10) and the merge (its
    layers), the restart warmup's lr 0 after each reset."""
    common = dict(batch=4, max_steps=12, logging_steps=1)
    w.run(tmp_path / "a", relora_kw={"cycle_length": 4}, save_strategy="steps", save_steps=7, save_only_model=True,
          **common)
    checkpoint = tmp_path / "a" / "checkpoint-7"
    assert not (checkpoint / "optimizer.pt").exists()
    with pytest.warns(UserWarning, match="resumed at step 7 with the schedule at step 0"):
        trainer, callback = w.run(tmp_path / "b", resume=str(checkpoint), relora_kw={"cycle_length": 3}, **common)
    assert [(e["step"], e["event"], e.get("overdue", False), "prune_skipped" in e) for e in callback.events] == [
        (7, "reset", True, True), (10, "reset", False, False)]
    assert callback.events[0]["layers"] > 0 and callback.events[1]["exp_avg"] > 0.9  # the second prunes
    lrs = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    assert lrs[8] == 0.0 and lrs[11] == 0.0  # the restart warmups after the resets at 7 and 10


def test_save_model_of_any_module_under_deepspeed_writes_its_merged_weights(tmp_path):
    """Found by a review: under DeepSpeed, save_model after train() of a model that is no PreTrainedModel (the
    Trainer takes any nn.Module) failed (the export builds a copy from a transformers config, which it lacks);
    without DeepSpeed, and before train(), it wrote model.safetensors. Now written as the Trainer saves such a
    module, merged. Oracle: relora_ds.unwrap of a fresh model holding the engine's trained state."""
    from safetensors.torch import load_file

    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--model", "holder", nprocs=1, timeout=600)
    assert [(e["step"], e["event"]) for e in json.loads((tmp_path / "run.json").read_text())["events"]] == [
        (3, "reset"), (6, "reset")]
    oracle = w.model("holder")
    oracle.load_state_dict(torch.load(tmp_path / "state.pt"))
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    assert_same_weights(saved, relora_ds.unwrap(oracle).state_dict(), rtol=1e-6)
