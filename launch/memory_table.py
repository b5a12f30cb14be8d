"""Per-GPU memory of the model presets by ZeRO stage, and the largest micro-batch that fits (README.md, "Running on a cluster").

    python launch/memory_table.py                       # 80 GB GPUs, 8 per ZeRO group, r=128, seq 512
    python launch/memory_table.py --gpus 16 --memory-gb 141 --global-batch-size 1152

The memory model it applies, with its formulas: relora_ds/memory.py.
"""
from __future__ import annotations

import argparse
import sys

from cli_types import DefaultsHelpFormatter, positive_float, positive_int
from relora_ds import LlamaConfig
from relora_ds import memory
from relora_ds.memory import (OFFLOAD_STAGES, activation_peak_bytes, activation_phases, dropout_mask_bytes,
                              frozen_bytes, host_state_bytes, largest_fitting_micro_batch, param_counts,
                              state_bytes, usable_bytes)

PRESETS = ("60m", "130m", "250m", "350m", "1b", "3b", "7b")


def batch_split_error(global_batch: int, gpus: int) -> str | None:
    """Why ``global_batch`` cannot be split over ``gpus`` ranks, with the nearest combinations that can; None
    if it can. The trainer needs global = micro-batch x GPUs x accumulation steps (relora_ds/ds_config.py)."""
    if global_batch % gpus == 0:
        return None
    below = max(d for d in range(1, gpus) if global_batch % d == 0)
    above = next((d for d in range(gpus + 1, global_batch + 1) if global_batch % d == 0), None)
    counts = f"{below} or {above}" if above else f"{below}"
    lower, upper = global_batch - global_batch % gpus, global_batch - global_batch % gpus + gpus
    batches = f"{lower} or {upper}" if lower else f"{upper}"
    return (f"--global-batch-size {global_batch} is not divisible by --gpus {gpus}, so no micro-batch can be used "
            f"(the trainer needs global batch = micro-batch x GPUs x accumulation steps): use {counts} GPUs, "
            f"or a global batch of {batches}")


def table(args) -> str:
    error = batch_split_error(args.global_batch_size, args.gpus)
    if error:
        raise ValueError(error)
    budget = usable_bytes(args.memory_gb, args.reserve_gb)
    per_rank = args.global_batch_size // args.gpus
    # what recomputes: every layer (True), none (False), or the first N (memory_table.recomputed_layers)
    ckpt = (args.activation_checkpointing_layers or True) if args.activation_checkpointing else False
    policy = args.activation_checkpointing_policy
    dropout_text = f"LoRA dropout {args.dropout:g} (keep-masks counted)" if args.dropout else "no LoRA dropout"
    ckpt_text = "off" if not ckpt else ("on" if ckpt is True else f"on (at most the first {ckpt} layers)") + \
        (", selective" if policy == "selective" else "")
    head = (f"{args.gpus} GPUs x {args.memory_gb:g} GB (usable {budget / 1e9:.1f} GB each), r={args.rank}, "
            f"seq {args.seq_len}, vocab {args.vocab_size}, bf16 + fp32 Adam, {dropout_text}, activation "
            f"checkpointing {ckpt_text}, base {args.quantize or 'bf16'}, loss "
            f"{f'chunked by {args.loss_chunk_size} tokens' if args.loss_chunk_size else 'on full logits'}; micro-batch = largest divisor of "
            f"global {args.global_batch_size} / {args.gpus} GPUs = {per_rank} that fits\n\n")
    offload = args.offload
    show_host = offload != "none" or args.quantize is not None
    if offload != "none":
        head = head[:-2] + (f"; offload: {offload}, states the GPU keeps (n/a: a stage DeepSpeed does not "
                            f"offload at)\n\n")
    rows = ["| preset | params | LoRA params | ReLoRA trainable | states/GPU warm start Z0 / Z1 / Z2 / Z3 (GB) "
            "| states/GPU ReLoRA Z0 / Z2 / Z3 (GB) | activations per seq. full / ReLoRA (GB) "
            "| micro-batch warm start Z0 / Z1 / Z2 / Z3 | micro-batch ReLoRA Z0 / Z2 / Z3 |"
            + (" host RAM/GPU start-up below Z3 / warm start / ReLoRA (GB) |" if show_host else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if show_host else "")]
    for name in args.presets:
        cfg = LlamaConfig.preset(name, vocab_size=args.vocab_size)
        c = param_counts(cfg, args.rank)
        total = c["projections"] + c["other"]
        trainable_lr = c["lora"] + c["other"]
        frozen = frozen_bytes(c, args.quantize)
        ok = OFFLOAD_STAGES[offload]
        full = {z: state_bytes(total, (0, 0), z, args.gpus, offload) if z in ok else None for z in range(4)}
        low = {z: state_bytes(trainable_lr, frozen, z, args.gpus, offload) if z in ok else None for z in (0, 2, 3)}
        act_full = activation_phases(cfg, args.seq_len, None, ckpt, args.loss_chunk_size, policy)
        # an int8 base under dropout runs the twin on the kernels' default path (run_phases)
        masks = dropout_mask_bytes(cfg, args.seq_len, twin=args.quantize is not None) if args.dropout else 0
        act_low = activation_phases(cfg, args.seq_len, args.rank, ckpt, args.loss_chunk_size, policy, masks)

        def mb(states, rank):
            if states is None:
                return "n/a"
            fit = largest_fitting_micro_batch(per_rank, lambda m: states + activation_peak_bytes(
                cfg, args.seq_len, rank, m, ckpt, args.loss_chunk_size, policy, masks if rank else 0) <= budget)
            return str(fit) if fit else "-"

        def gb(states):
            return "n/a" if states is None else f"{states / 1e9:.1f}"

        host = ""
        if show_host:
            z = max(ok)  # the offloaded bytes per GPU are the same at every stage that allows the offload
            residual = c["projections"] if args.quantize == "int8" else 0
            startup = 4 * total if min(ok) < 3 else 0  # ZeRO-3 builds it partitioned (relora_ds/zero_init.py)
            host = (f" {startup / 1e9:.1f} / {host_state_bytes(total, (0, 0), z, args.gpus, offload) / 1e9:.1f}"
                    f" / {host_state_bytes(trainable_lr, frozen, z, args.gpus, offload, residual) / 1e9:.1f} |")

        rows.append(
            f"| {name} | {total / 1e6:,.0f}M | {c['lora'] / 1e6:,.1f}M | {trainable_lr / 1e6:,.0f}M "
            f"| {' / '.join(gb(full[z]) for z in range(4))} "
            f"| {' / '.join(gb(low[z]) for z in (0, 2, 3))} "
            f"| {max(p for p, _ in act_full) / 1e9:.2f} / {max(p for p, _ in act_low) / 1e9:.2f} "
            f"| {' / '.join(mb(full[z], None) for z in range(4))} "
            f"| {' / '.join(mb(low[z], args.rank) for z in (0, 2, 3))} |{host}")
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=f"{__doc__}\n{memory.__doc__}",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS),
                        help="model presets (relora_ds.PRESETS), space- or comma-separated")
    parser.add_argument("--gpus", type=positive_int, default=8, help="data-parallel ranks sharing ZeRO states")
    parser.add_argument("--memory-gb", type=positive_float, default=80.0, help="memory per GPU (GB, 1e9 bytes)")
    parser.add_argument("--reserve-gb", type=float, default=None,
                        help="GiB kept free for context, buffers, fragmentation (default: 10%% + 2 GiB)")
    parser.add_argument("--rank", type=positive_int, default=128, help="LoRA rank r")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=positive_int, default=32000, help="the embedding's rows")
    parser.add_argument("--global-batch-size", type=positive_int, default=1152, help="the recipe's global batch")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="the trainer's --activation-checkpointing: layers keep only their inputs")
    parser.add_argument("--activation-checkpointing-layers", type=positive_int, default=None,
                        help="with --activation-checkpointing: only the first N decoder layers recompute (the "
                             "trainer's --activation-checkpointing-layers; a preset with fewer: all of its layers)")
    parser.add_argument("--activation-checkpointing-policy", choices=("full", "selective"), default="full",
                        help="with --activation-checkpointing: the trainer's --activation-checkpointing-policy "
                             "(selective: recomputed layers also keep their matmul and attention outputs)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="the trainer's --dropout (LoRA dropout; default 0.1, the paper recipes'): its "
                             "keep-masks add to the ReLoRA phase's activations; 0: none")
    parser.add_argument("--quantize", choices=("int8",), help="the trainer's --quantize: int8 frozen base weights")
    parser.add_argument("--offload", choices=tuple(OFFLOAD_STAGES), default="none",
                        help="what the DeepSpeed config offloads to host memory (ds_configs/zero2_offload.json: "
                             "optimizer; zero3_offload.json: optimizer+parameters; ZeRO-3 may offload the "
                             "parameters alone)")
    parser.add_argument("--loss-chunk-size", type=int, default=0,
                        help="the trainer's --loss-chunk-size: the loss without full logits (0: off)")
    args = parser.parse_args(argv)
    if args.activation_checkpointing_layers and not args.activation_checkpointing:
        parser.error("--activation-checkpointing-layers needs --activation-checkpointing")
    if args.activation_checkpointing_policy != "full" and not args.activation_checkpointing:
        parser.error("--activation-checkpointing-policy needs --activation-checkpointing")
    if not 0 <= args.dropout < 1:
        parser.exit(2, f"error: --dropout must be in [0, 1) (0: none), got {args.dropout:g}\n")
    if args.loss_chunk_size < 0:
        parser.exit(2, f"error: --loss-chunk-size must be >= 0 (0: off), got {args.loss_chunk_size}\n")
    args.presets = [n for item in args.presets for n in item.split(",") if n]
    memory_gib = args.memory_gb * 1e9 / 2**30
    if args.reserve_gb is not None and not 0 <= args.reserve_gb < memory_gib:
        parser.error(f"--reserve-gb must be in [0, {memory_gib:.1f}) GiB (the --memory-gb {args.memory_gb:g} GB), "
                     f"got {args.reserve_gb:g}")
    try:
        for name in args.presets:
            config = LlamaConfig.preset(name)
            smallest = min(config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim)
            if args.rank > smallest:
                raise ValueError(f"--rank {args.rank} is larger than {name}'s smallest targeted layer dimension "
                                 f"{smallest} (the trainer refuses it); valid ranks: 1..{smallest}")
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    error = batch_split_error(args.global_batch_size, args.gpus)
    if error:
        parser.error(error)
    try:
        text = table(args)
    except ValueError as e:
        parser.error(str(e))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
