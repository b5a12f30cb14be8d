"""Single-process ReLoRA on real text with plain torch (no DeepSpeed): the public API end to end."""
import torch

import relora_ds
from relora_ds.data import PackedTokens, ShardedBatches


def test_tiny_relora_loop_learns_across_resets(small_data_dir):
    torch.manual_seed(0)
    data = PackedTokens(small_data_dir, "train", seq_len=32)
    batches = ShardedBatches(data, 16, rank=0, world_size=1, seed=0)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug"))
    relora_ds.wrap(model, rank=8, alpha=16)
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    total, cycle = 240, 60
    sched = relora_ds.build_scheduler(opt, "jagged_cosine", total_steps=total, warmup_steps=20,
                                      cycle_length=cycle, restart_warmup_steps=10)
    losses, resets = [], 0
    for step in range(1, total + 1):
        batch = next(batches)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % cycle == 0 and step < total:
            relora_ds.merge_and_reinit(model)
            stats = relora_ds.prune_optimizer_state(opt, relora_ds.lora_parameters(model), ratio=0.99)
            assert abs(stats["exp_avg_sq"] - 0.99) < 1e-3 and stats["exp_avg"] >= stats["exp_avg_sq"]
            resets += 1
    assert resets == 3
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first - 1.0, (first, last)  # from ~ln(512) = 6.2 to below 5.2
    # Three merges of rank-8 updates: the frozen weight moved by more than any single rank-8 update can.
    delta = model.model.layers[0].mlp.down_proj.weight.detach() - w0
    assert torch.linalg.matrix_rank(delta, rtol=1e-3) > 8
    assert all(int(l.merge_count) == 3 for _, l in relora_ds.relora_layers(model))
