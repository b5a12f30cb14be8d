"""enable_relora under accelerate's FSDP2 (TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2, ...})) on 2
CPU ranks (gloo), against the same Trainer run under DDP. This file is also the ranks' script (``main``).

accelerate builds FSDP only in its branch for accelerator devices (accelerate/state.py, AcceleratorState: MULTI_GPU,
MULTI_NPU, ...); on CPU ranks it keeps MULTI_CPU and the Trainer trains under DDP, silently. The FSDP2 rank below
does what that branch does (distributed_type FSDP, the plugin kept, its mixed precision set), so accelerate's own
FSDP2 preparation runs: fully_shard on each decoder layer and the root, checkpoint_wrapper from fsdp_config's
activation_checkpointing, the optimizer moved onto the DTensor parameters, FSDP2 checkpoints."""
import json
import sys
from pathlib import Path

import torch

SAVE_STEPS, STEPS = 4, 8  # resets at 3 and 6 (hf_trainer_worker.RELORA); step 8's lr > 0, so B is live at the end


def _arguments(out, fsdp: bool, **extra):
    import hf_trainer_worker as w
    from transformers import TrainingArguments

    fsdp_kw = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                           "activation_checkpointing": True}) if fsdp else {}
    return TrainingArguments(**{**w.arguments(out, 2), "ddp_backend": "gloo", "max_steps": STEPS, **fsdp_kw,
                                **extra})


def _build_fsdp_on_cpu() -> None:
    """accelerate's FSDP branch for accelerator devices, taken on CPU ranks (module docstring)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = fsdp_on_cpu


def _record_resets(checks: list) -> None:
    """The callback's merge and prune, each checked on the whole tensors against one process's: W_after = W_before
    + s·B·A (the factors before the merge), merge_count + 1, B = 0; the moments are those prune_optimizer_state
    leaves in a plain AdamW holding the gathered moments of plain copies of the factors."""
    import relora_ds
    import relora_ds.hf_trainer as hf_trainer
    from relora_ds.sharded import whole

    merge, prune = hf_trainer.merge_and_reinit, hf_trainer.prune_optimizer_state

    def checked_merge(model):
        before = {name: [whole(t).clone() for t in (layer.weight, layer.lora_A, layer.lora_B)] +
                  [layer.scale, int(layer.merge_count)] for name, layer in relora_ds.relora_layers(model)}
        out = merge(model)
        error = update = 0.0
        for name, layer in relora_ds.relora_layers(model):
            weight, A, B, scale, count = before[name]
            error = max(error, (whole(layer.weight) - (weight + (B @ A) * scale)).abs().max().item())
            update = max(update, ((B @ A) * scale).abs().max().item())
            assert int(layer.merge_count) == count + 1 and not whole(layer.lora_B).any(), name
        checks.append({"merge_error": error, "update": update, "layers": len(before)})
        return out

    def checked_prune(optimizer, params, **kwargs):
        params = list(params)
        plain = [torch.nn.Parameter(whole(p).detach().clone()) for p in params]
        one = torch.optim.AdamW(plain)
        for p, q in zip(params, plain):
            one.state[q] = {"step": torch.tensor(1.0),
                            **{k: whole(optimizer.state[p][k]).clone() for k in ("exp_avg", "exp_avg_sq")}}
        prune(one, plain, **kwargs)
        out = prune(optimizer, params, **kwargs)
        checks.append({"moments_differing": sum(not torch.equal(whole(optimizer.state[p][k]), one.state[q][k])
                                                for p, q in zip(params, plain) for k in ("exp_avg", "exp_avg_sq")),
                       "params": len(params)})
        return out

    hf_trainer.merge_and_reinit, hf_trainer.prune_optimizer_state = checked_merge, checked_prune


def _train(out, fsdp: bool, resume=None, **extra):
    import hf_trainer_worker as w
    from relora_ds.hf_trainer import enable_relora

    model = w.model()
    trainer = w.InOrder(model=model, args=_arguments(out, fsdp, **extra), train_dataset=w.Windows())
    callback = enable_relora(trainer, **w.RELORA)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, model


def main():
    import torch.distributed as dist

    from relora_ds.sharded import is_sharded, whole

    sys.path.insert(0, str(Path(__file__).parent / "dist"))  # hf_trainer_worker
    mode, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    if mode == "ddp":
        trainer, callback, model = _train(out / "ddp", fsdp=False)
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        result = {"state": {k: v.clone() for k, v in model.state_dict().items()}}
    else:
        from torch.distributed.fsdp import FSDPModule

        _build_fsdp_on_cpu()
        checks = []
        _record_resets(checks)
        trainer, callback, model = _train(out / "fsdp2", fsdp=True, save_strategy="steps", save_steps=SAVE_STEPS)
        assert isinstance(trainer.model_wrapped, FSDPModule) and is_sharded(next(iter(
            p for n, p in model.named_parameters() if "lora_A" in n))), type(trainer.model_wrapped)
        state, checks_before_resume = {k: whole(v).clone() for k, v in model.state_dict().items()}, list(checks)
        trainer.save_model(str(out / "saved"))
        import hf_trainer_worker as w

        ids = torch.randint(0, w.VOCAB, (2, w.SEQ), generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        resumed, _, again = _train(out / "fsdp2", fsdp=True, resume=str(out / f"fsdp2/checkpoint-{SAVE_STEPS}"))
        result = {"state": state, "checks": checks_before_resume, "resumed_checks": checks[len(checks_before_resume):],
                  "logits": logits, "ids": ids,
                  "resumed_losses": [h["loss"] for h in resumed.state.log_history if "loss" in h],
                  "resumed_state": {k: whole(v).clone() for k, v in again.state_dict().items()}}
    result.update(losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                  events=[(e["step"], e["event"]) for e in callback.events])
    if dist.get_rank() == 0:
        torch.save(result, out / f"{mode}.pt")
    print(json.dumps({"rank": dist.get_rank(), "done": mode}), flush=True)


_RUNS = {}


def _runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    """The DDP run and the FSDP2 run (with its resume and save_model), each 2 ranks, once for this file."""
    if not _RUNS:
        from launch_utils import run_ranks

        out = tmp_path_factory.mktemp("hf_fsdp")
        for mode in ("ddp", "fsdp2"):
            proc = run_ranks(Path(__file__), mode, out, timeout=300)
            assert proc.stdout.count(f'"done": "{mode}"') == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        _RUNS.update(ddp=torch.load(out / "ddp.pt"), fsdp2=torch.load(out / "fsdp2.pt"), out=out)
    return _RUNS["ddp"], _RUNS["fsdp2"], _RUNS["out"]


def test_hf_trainer_under_fsdp2_trains_as_ddp_and_resets_as_one_process(tmp_path_factory):
    """accelerate's FSDP2 (decoder layers in checkpoint_wrapper, sharded, then the root) on 2 ranks, 8 steps with
    resets at 3 and 6: the losses are the DDP run's and so is every final tensor (fp32 reduction order: measured
    4.8e-7 and 1.1e-6); each merge is W + s·B·A on the whole weight, once (error 0; the update itself is ~0.1),
    each prune leaves the moments one process's prune leaves (bit for bit), and the run resumed from checkpoint-4
    (FSDP2's checkpoint, across the reset at 6, merging once there) ends bit for bit where the uninterrupted run
    ends."""
    ddp, fsdp2, _ = _runs(tmp_path_factory)
    assert fsdp2["events"] == ddp["events"] == [(3, "reset"), (6, "reset")]
    assert len(fsdp2["losses"]) == len(ddp["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(fsdp2["losses"], ddp["losses"])) < 1e-5, (fsdp2["losses"], ddp["losses"])
    assert set(fsdp2["state"]) == set(ddp["state"])  # (state_dict keys leave checkpoint_wrapper's module out)
    worst = max((fsdp2["state"][k].double() - v.double()).abs().max().item() for k, v in ddp["state"].items())
    assert worst < 1e-5, worst
    merges, prunes = fsdp2["checks"][0::2], fsdp2["checks"][1::2]
    assert [m["merge_error"] for m in merges] == [0.0, 0.0] and min(m["update"] for m in merges) > 1e-2, merges
    assert all(m["layers"] == 14 for m in merges), merges
    assert [(p["moments_differing"], p["params"]) for p in prunes] == [(0, 28), (0, 28)], prunes
    assert [(c.get("merge_error"), c.get("moments_differing")) for c in fsdp2["resumed_checks"]] == \
        [(0.0, None), (None, 0)], fsdp2["resumed_checks"]  # the resumed run: the reset at 6, once
    assert fsdp2["resumed_losses"][SAVE_STEPS:] == fsdp2["losses"][SAVE_STEPS:]
    differ = [k for k, v in fsdp2["state"].items() if not torch.equal(v, fsdp2["resumed_state"][k])]
    assert not differ, differ[:4]


def test_hf_trainer_under_fsdp2_save_model_writes_the_merged_plain_model(tmp_path_factory):
    """save_model of the FSDP2 run (its decoder layers in accelerate's checkpoint_wrapper): from_pretrained loads
    every weight with no key left over and no lora_* key, and gives the trained sharded model's logits, B·A live
    (step 8's lr > 0). The merged weights were written under the module names, '_checkpoint_wrapped_module.' in
    them, beside the unmerged base and the factors under state_dict's names: transformers loaded the base alone
    (the last cycle's s·B·A dropped: logits off by 0.15), reporting the extra keys only."""
    from transformers import LlamaForCausalLM

    _, fsdp2, out = _runs(tmp_path_factory)
    assert any(fsdp2["state"][k].any() for k in fsdp2["state"] if k.endswith("lora_B"))
    loaded, info = LlamaForCausalLM.from_pretrained(out / "saved", output_loading_info=True)
    assert not any(info.values()), info
    assert not [k for k in loaded.state_dict() if "lora" in k or "checkpoint" in k]
    with torch.no_grad():
        logits = loaded(input_ids=fsdp2["ids"]).logits
    assert (logits - fsdp2["logits"]).abs().max().item() < 1e-5


def test_merged_state_dict_names_the_layers_of_checkpoint_wrapped_modules_as_state_dict_does():
    """One process, no FSDP: torch's checkpoint_wrapper (what fsdp_config's activation_checkpointing applies)
    leaves its module's name out of state_dict's keys, and merged_state_dict wrote the merged weights under the
    wrapped names beside the unmerged bases and the LoRA factors. Oracle: the same model without the wrappers."""
    import transformers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    import relora_ds
    from relora_ds.hf import merged_state_dict

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = relora_ds.wrap(transformers.LlamaForCausalLM(config), rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()  # a live update, which the merged weights must hold
    want = merged_state_dict(model)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, type(model.model.layers[0])))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    got = merged_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


if __name__ == "__main__":
    from relora_ds.distributed import run_and_exit

    run_and_exit(main)  # no interpreter teardown, as every other worker (relora_ds.distributed.exit_process)
