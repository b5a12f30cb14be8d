"""Optimizers other than Adam/AdamW behind a DeepSpeed engine (the Python API: deepspeed.initialize with a client
optimizer, then relora_ds.prune_optimizer_state(engine, ...)). The trainer's JSON accepts only Adam/AdamW; a client
optimizer can be any torch one. The prune must either prune the Adam moments exactly as one process would (an
Adam-family optimizer whose state holds exp_avg and exp_avg_sq: RAdam) or refuse, on every rank alike and before
its first collective, one whose state lacks them: torch's Adamax has Adam's betas and eps in its param groups but
keeps exp_inf, not exp_avg_sq (a review found it passing the param-group check, then DeepSpeed's "exp_avg_sq not
found in optimizer state fragment" on the rank holding the tensor while the other waited in the all-reduce).

Run as a script, this file is the 2-rank worker of test_a_client_optimizer_under_zero2_prunes_or_refuses_on_every_rank.
"""
import json
import sys
from pathlib import Path

import pytest

RATIO = 0.9


def _sort_mask(t, ratio):
    """The oracle: the round(ratio * n) smallest |t|, by a stable sort (ties: lowest flat index first)."""
    import torch

    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[torch.sort(t.reshape(-1).abs(), stable=True).indices[:round(ratio * t.numel())]] = True
    return mask.view(t.shape)


def test_a_stage_0_engine_with_adamax_is_refused_naming_its_state_before_any_change():
    """Adamax's param groups look like Adam's (betas, eps); its state does not (exp_inf for exp_avg_sq). The prune
    read exp_avg, then failed with KeyError('exp_avg_sq'). It must be a ValueError naming the optimizer, the state
    it keeps and what is supported, with every moment as it was."""
    import torch
    import transformers

    import relora_ds
    from test_zero_reset import _Stage0Engine  # its stand-in for a stage-0 fp32 engine

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = relora_ds.wrap(transformers.LlamaForCausalLM(cfg), rank=3, seed=5)
    opt = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # the second step gives lora_A a gradient (B is no longer zero)
        x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(step))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    engine = _Stage0Engine(model, opt)
    lora = relora_ds.lora_parameters(model)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in lora}
    with pytest.raises(ValueError, match=r"prune_optimizer_state: the engine's optimizer \(Adamax\) keeps no Adam "
                                         r"moments \(exp_avg, exp_avg_sq\) in every param group \(its state: "
                                         r"\['exp_avg', 'exp_inf', 'step'\]\); ReLoRA under DeepSpeed supports "
                                         r"Adam/AdamW"):
        relora_ds.prune_optimizer_state(engine, lora, "magnitude", RATIO)
    for p in lora:
        assert all(torch.equal(v, before[id(p)][k]) for k, v in opt.state[p].items())


def test_a_client_optimizer_under_zero2_prunes_or_refuses_on_every_rank():
    """ZeRO-2 on 2 gloo ranks with a client optimizer (the factors straddle the ranks' partitions unevenly: one
    rank holds no piece of the first tensors). RAdam (exp_avg, exp_avg_sq): every moment pruned as the sort
    oracle masks the gathered pre-prune moments (exp_avg also where exp_avg_sq is). Adamax: both ranks raise the
    same ValueError naming its state, and the flat state is unchanged; before, rank 0 raised DeepSpeed's
    "exp_avg_sq not found in optimizer state fragment" and rank 1, in the all-reduce, lost its peer."""
    from launch_utils import run_each_rank

    results = run_each_rank(Path(__file__), "worker", timeout=240)
    for rc, out in results:
        assert rc == 0, out[-4000:]
    per_rank = [json.loads(next(line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")))
                for _, out in results]
    assert per_rank[0]["no_piece_on_rank1"], per_rank  # the case where the other rank used to wait in the gather
    for r in per_rank:
        assert r["RAdam"] == {"error": None, "matches_oracle": True, "some_pruned": True}, r
        assert r["Adamax"]["unchanged"], r
        assert r["Adamax"]["error"].startswith(
            "prune_optimizer_state: the engine's optimizer (Adamax) keeps no Adam moments (exp_avg, exp_avg_sq) in "
            "every param group (its state: ['exp_avg', 'exp_inf', 'step'])"), r


@pytest.mark.parametrize("given", [{"adam_beta2": 0.95}, {"adam_epsilon": 1e-6}, {}])
def test_adam_settings_a_deepspeed_optimizer_section_leaves_out_are_named(tmp_path, monkeypatch, given):
    """Under the HF Trainer a DeepSpeed 'optimizer' section with lr and weight_decay but no betas or eps: transformers
    fills only "auto" values, so DeepSpeed ran its AdamW's defaults whatever TrainingArguments said (adam_beta2=0.95
    trained with 0.999), and enable_relora said nothing. Oracle: the torch AdamW DeepSpeed builds from the section's
    params (as its _configure_basic_optimizer does): refused exactly when its betas or eps differ from the arguments'.
    """
    import torch
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from launch_utils import ROOT
    from relora_ds import hf_trainer

    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    import hf_trainer_worker as w

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, **given)
    hf = HfTrainerDeepSpeedConfig({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}})
    hf.trainer_config_process(args)  # what the Trainer hands DeepSpeed
    monkeypatch.setattr(hf_trainer, "_deepspeed_config", lambda trainer: hf.config)
    built = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **hf.config["optimizer"]["params"]).defaults
    differs = list(built["betas"]) != [args.adam_beta1, args.adam_beta2] or built["eps"] != args.adam_epsilon
    assert differs == bool(given)

    def enable():
        hf_trainer.enable_relora(w.InOrder(model=w.model(), args=args, train_dataset=w.Windows()), cycle_length=3,
                                 restart_warmup_steps=1)
    if differs:
        key = "betas" if "adam_beta2" in given else "eps"
        with pytest.raises(ValueError, match=rf"'optimizer' section sets no {key} \(TrainingArguments: .*; DeepSpeed "
                                             r"would run .*\)\. Set them to \"auto\" in its params"):
            enable()
        hf.config["optimizer"]["params"][key] = "auto"  # the way out: the Trainer fills it
        hf.trainer_config_process(args)
    enable()


def _worker():
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import relora_ds
    from relora_ds.distributed import init_distributed
    from relora_ds.zero_reset import get_full, relink_optimizer_fragments

    init_distributed()
    out = {}
    for name in ("RAdam", "Adamax"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=64)
        model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11)
        opt = getattr(torch.optim, name)([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True})
        for step in range(2):
            x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5 + step))
            engine.backward(engine(x, labels=x).loss)
            engine.step()
        lora = relora_ds.lora_parameters(engine.module)
        out["no_piece_on_rank1"] = dist.get_rank() != 1 or lora[0]._hp_mapping is None
        flat = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                for st in engine.optimizer.optimizer.state.values()]
        before = None
        if name == "RAdam":
            relink_optimizer_fragments(engine)
            before = [{k: get_full(p, k).clone() for k in ("exp_avg", "exp_avg_sq")} for p in lora]
        try:
            relora_ds.prune_optimizer_state(engine, lora, "magnitude", RATIO)
            res = {"error": None}
        except ValueError as e:
            res = {"error": str(e)}
        if name == "RAdam" and res["error"] is None:
            after = [{k: get_full(p, k) for k in ("exp_avg", "exp_avg_sq")} for p in lora]
            ok, pruned = True, False
            for b, a in zip(before, after):
                sq = _sort_mask(b["exp_avg_sq"], RATIO)
                ok &= torch.equal(a["exp_avg_sq"], b["exp_avg_sq"].masked_fill(sq, 0.0))
                ok &= torch.equal(a["exp_avg"], b["exp_avg"].masked_fill(_sort_mask(b["exp_avg"], RATIO) | sq, 0.0))
                pruned |= bool((b["exp_avg_sq"] != a["exp_avg_sq"]).any())
            res.update(matches_oracle=bool(ok), some_pruned=pruned)
        if name == "Adamax":
            states = engine.optimizer.optimizer.state.values()
            res["unchanged"] = all(torch.equal(v, b[k]) for st, b in zip(states, flat)
                                   for k, v in st.items() if torch.is_tensor(v))
        out[name] = res
        engine.destroy()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
