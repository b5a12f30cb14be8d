"""Hugging Face Trainer runs with ReLoRA (relora_ds.hf_trainer) for tests/test_hf_trainer.py: in-process
(``run``) or one rank of a 2-rank DeepSpeed job (``python hf_trainer_worker.py --out DIR --stage N``, started by
tests/launch_utils.run_ranks). Same model, data order and settings everywhere; the data is read in order (no
shuffling), so rank r of k takes every k-th micro-batch and a k-rank step sees one process's batch of k times
the micro-batch."""
import argparse
import json
import os
import sys
import warnings

import deepspeed
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)
from transformers.integrations import is_deepspeed_zero3_enabled

import relora_ds
from relora_ds.hf_trainer import enable_relora

SEQ, VOCAB, SAMPLES, HIDDEN = 17, 96, 64, 48
RELORA = dict(cycle_length=3, restart_warmup_steps=1, min_lr_ratio=0.1)
HP = dict(learning_rate=2e-2, warmup_steps=1, max_steps=7, weight_decay=0.0, max_grad_norm=1.0, seed=5,
          adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)


class Windows(Dataset):
    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def plain(kind="llama"):
    """A tiny transformers LLaMA, or a GPT-2 (its projections are transformers' Conv1D, weight (in, out))."""
    torch.manual_seed(0)
    if kind == "gpt2":  # no dropout: the hand-written loop draws no dropout masks
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(cfg)


class Holder(torch.nn.Module):
    """A model that is no PreTrainedModel (no config): the Trainer takes any nn.Module."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels=None):
        return self.lm(input_ids=input_ids, labels=labels)


def model(kind="llama", source=None, quantize=None):
    """``plain(kind)`` wrapped ('all-linear' for GPT-2), or the model saved in ``source`` loaded and wrapped:
    under a ZeRO-3 TrainingArguments, from_pretrained builds it partitioned (deepspeed.zero.Init), the way a
    model too large for one GPU is loaded, and wrap converts the partitioned layers."""
    if kind == "holder":  # the LLaMA inside a plain nn.Module
        return relora_ds.wrap(Holder(plain()), rank=4, seed=3, quantize=quantize)
    if source is None:
        base = plain(kind)
    else:
        base = AutoModelForCausalLM.from_pretrained(source)
        if is_deepspeed_zero3_enabled():
            assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in base.parameters()), "not built partitioned"
    if kind == "gpt2":
        # transformers 5.25's GPT-2 leaves loss_type None, and the Trainer then divides the summed loss by the
        # count of all labels, not of the shifted ones (x 16/17 here): name the loss it computes anyway.
        base.loss_type = "ForCausalLM"
        return relora_ds.wrap(base, rank=4, seed=3, target_modules="all-linear", quantize=quantize)
    return relora_ds.wrap(base, rank=4, seed=3, quantize=quantize)


class Held(Windows):
    """8 windows past the training set's: what evaluation reads."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return super().__getitem__(SAMPLES + i)


class InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def arguments(out_dir, batch) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=batch, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, optim="adamw_torch", disable_tqdm=True, **HP)


def run(out_dir, batch, deepspeed=None, relora=True, kind="llama", source=None, quantize=None, selective=False,
        resume=None, relora_kw=None, save_before=None, **overrides):
    """Train (from the checkpoint directory ``resume``, where given); returns (trainer, callback or None).
    ``eval_dataset`` in ``overrides``: the Trainer's evaluation set.
    ``selective``: the model recomputes its layers under relora_ds's selective checkpointing policy;
    ``relora_kw``: enable_relora's arguments over RELORA; ``save_before``: save_model there before training."""
    eval_dataset = overrides.pop("eval_dataset", None)
    args = TrainingArguments(**{**arguments(out_dir, batch), "deepspeed": deepspeed, **overrides})
    if source is not None and deepspeed is not None:
        # zero.Init (inside from_pretrained) needs the process group, which the Trainer would start only later
        import deepspeed as ds
        ds.init_distributed()
    net = model(kind, source, quantize)
    if selective:
        from relora_ds.checkpointing import hf_checkpointing_kwargs
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=hf_checkpointing_kwargs(net))
    trainer = InOrder(model=net, args=args, train_dataset=Windows(), eval_dataset=eval_dataset)
    callback = enable_relora(trainer, **{**RELORA, **(relora_kw or {})}) if relora else None
    if save_before:
        trainer.save_model(save_before)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--model", choices=["llama", "gpt2", "holder"], default="llama")
    ap.add_argument("--source", help="a saved plain(model): loaded with from_pretrained (at ZeRO-3: partitioned)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (batch 2 / this)")
    ap.add_argument("--refuse-config", help="only check that enable_relora refuses this DeepSpeed config")
    ap.add_argument("--via", choices=["deepspeed=", "accelerate"], help="--refuse-config given as deepspeed= or "
                                                                       "through accelerate's environment")
    ap.add_argument("--selective", action="store_true", help="relora_ds's selective activation checkpointing")
    ap.add_argument("--save-steps", type=int, help="a Trainer checkpoint every N steps")
    ap.add_argument("--resume", help="a Trainer checkpoint directory to resume from")
    ap.add_argument("--bf16", action="store_true", help="train in bf16 (DeepSpeed's bf16 section)")
    ap.add_argument("--save-before", action="store_true", help="save_model to OUT/before before training")
    ap.add_argument("--push", action="store_true", help="push_to_hub, hub_strategy 'checkpoint', to a stand-in Hub: "
                                                       "OUT/pushed.json holds the zero_to_fp32.py each push found")
    ap.add_argument("--fail-recovery", action="store_true", help="rank 0's write of the recovery scripts fails "
                                                                 "(a full disk)")
    ap.add_argument("--ddp-timeout", type=int, help="the process group's timeout, seconds")
    ap.add_argument("--cycle-length", type=int, help="enable_relora's cycle_length (default RELORA's)")
    ap.add_argument("--max-steps", type=int, help="optimizer steps (default HP's)")
    ap.add_argument("--eval-steps", type=int, help="evaluate (8 windows the training never reads) every N steps")
    ap.add_argument("--load-best", action="store_true", help="load_best_model_at_end (by eval_loss), with "
                                                             "save_total_limit 1")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TrainingArguments' gradient_checkpointing")
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    if a.refuse_config:
        return check_scheduler_refused(a.out, a.refuse_config, a.via)
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          # ZeRO-3: every weight partitioned, or (--selective) DeepSpeed's default: the small ones persist
          "zero_optimization": {"stage": a.stage, **({"stage3_param_persistence_threshold": 0}
                                                     if a.stage == 3 and not a.selective else {}),
                                # the selective policy keeps matmul outputs a replaced F.linear would add into
                                **({"memory_efficient_linear": False} if a.selective else {})},
          "bf16": {"enabled": "auto" if a.bf16 else False}}
    if a.stage == 3:  # DeepSpeed's own optimizer section: transformers then asks for the schedule of that optimizer
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        saving = dict(save_strategy="steps", save_steps=a.save_steps) if a.save_steps else {}
        if a.eval_steps:
            saving.update(eval_strategy="steps", eval_steps=a.eval_steps, eval_dataset=Held())
        if a.gradient_checkpointing:
            saving.update(gradient_checkpointing=True)
        if a.load_best:
            saving.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", save_total_limit=1)
        pushed = stand_in_hub() if a.push else None
        saving.update(dict(push_to_hub=True, hub_strategy="checkpoint") if a.push else {},
                      **({"ddp_timeout": a.ddp_timeout} if a.ddp_timeout else {}))
        if a.fail_recovery and int(os.environ["RANK"]) == 0:
            import relora_ds.recovery

            def full_disk(*args, **kwargs):
                raise OSError(28, "No space left on device")
            relora_ds.recovery.replace_durably = full_disk
        trainer, callback = run(a.out, batch=2 // a.grad_accum, deepspeed=ds, kind=a.model, source=a.source,
                                gradient_accumulation_steps=a.grad_accum, selective=a.selective, resume=a.resume,
                                bf16=a.bf16, save_before=os.path.join(a.out, "before") if a.save_before else None,
                                relora_kw={"cycle_length": a.cycle_length} if a.cycle_length else None,
                                **({"max_steps": a.max_steps} if a.max_steps else {}), **saving)
    # accelerate steps the engine only at accumulation boundaries: the merges after them are not inside one
    wrong = [str(x.message) for x in seen if "inside a gradient accumulation" in str(x.message)]
    assert not wrong, wrong
    engine = trainer.model_wrapped
    assert type(engine).__name__ == "DeepSpeedEngine", type(engine)
    params = list(engine.module.parameters())
    if a.stage == 3 and not a.selective:
        assert all(p.numel() == 0 for p in params), "ZeRO-3 left a weight whole"
    with deepspeed.zero.GatheredParameters(params, enabled=a.stage == 3):  # every rank takes part
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    trainer.save_model(os.path.join(a.out, "hf"))  # the merged model: export_hf(engine) on every rank
    if int(os.environ["RANK"]) == 0:
        torch.save(state, os.path.join(a.out, "state.pt"))
        with open(os.path.join(a.out, "run.json"), "w") as f:
            json.dump({"events": [{k: e[k] for k in ("step", "event", "overdue") if k in e} for e in callback.events],
                       "log": trainer.state.log_history, "pushed": pushed,
                       "best": trainer.state.best_model_checkpoint}, f)
    sys.stdout.flush()


def stand_in_hub() -> list[dict]:
    """The Trainer's Hub calls replaced (no network): each checkpoint push records, as it starts, the recovery
    script the folder it uploads holds (the real one uploads in a thread from then on). Returns the records."""
    pushed = []

    def init_hf_repo(self, token=None, private=None):
        self.hub_model_id, self.push_in_progress = "relora-ds/stand-in", None

    def push_from_checkpoint(self, folder):
        if self.is_world_process_zero():  # as the Trainer's: rank 0 pushes
            script = os.path.join(folder, "zero_to_fp32.py")
            pushed.append({"folder": os.path.basename(folder), "zero_to_fp32.py": open(script).read()})

    Trainer.init_hf_repo, Trainer._push_from_checkpoint = init_hf_repo, push_from_checkpoint
    Trainer.push_to_hub = lambda self, *args, **kwargs: None  # save_model's upload of the final model
    return pushed


def check_scheduler_refused(out_dir: str, config: str, via: str) -> None:
    """enable_relora refuses a DeepSpeed config with a 'scheduler' section, handed to the Trainer as deepspeed=
    or through the environment (`accelerate launch --use_deepspeed --deepspeed_config_file FILE`)."""
    if via == "accelerate":
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=config)
    args = TrainingArguments(**arguments(out_dir, 2), deepspeed=config if via == "deepspeed=" else None)
    assert (getattr(args, "hf_deepspeed_config", None) is None) == (via == "accelerate")
    trainer = InOrder(model=model(), args=args, train_dataset=Windows())
    assert trainer.is_deepspeed_enabled
    try:
        enable_relora(trainer, **RELORA)
    except ValueError as e:
        print(f"{via} refused: {e}", flush=True)


if __name__ == "__main__":
    from relora_ds.distributed import run_and_exit

    # No interpreter teardown: there gloo's threads can abort a finished rank ("terminate called without an
    # active exception", exit -6; seen in CI after the run had written every result).
    run_and_exit(main)
