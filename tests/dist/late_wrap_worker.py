"""One process (tests/test_relora_api.py): relora_ds.wrap called after deepspeed.initialize, at ZeRO stages 0, 2
and 3, must be refused with the order to follow; prints one line per refusal seen."""
import re
import warnings

import torch

import relora_ds
from relora_ds.distributed import init_distributed, run_and_exit
from tiny_engine import tiny_engine, tiny_llama  # tests/dist, this script's folder

ORDER = "before deepspeed.initialize"


def refused(what, call, pattern):
    try:
        call()
    except ValueError as e:
        assert re.search(pattern, str(e), re.S) and ORDER in str(e), str(e)
        print(what, "refused", flush=True)
        return
    raise AssertionError(f"{what} was accepted")


def main():
    init_distributed()
    for stage in (0, 2, 3):
        engine = tiny_engine(tiny_llama(), stage)
        refused(f"stage {stage}: wrap(engine)", lambda: relora_ds.wrap(engine, rank=4), "already in a DeepSpeed engine")
        if stage == 2:  # ZeRO-1/2 link every weight to its master: the module is refused too
            refused(f"stage {stage}: wrap(engine.module)", lambda: relora_ds.wrap(engine.module, rank=4),
                    "already in a DeepSpeed engine")
        else:  # no such link at stage 0 or 3 (ZeRO-3 weights look like zero.Init's): the first reset refuses
            relora_ds.wrap(engine.module, rank=4)
            lora = relora_ds.lora_parameters(engine.module)
            refused(f"stage {stage}: merge", lambda: relora_ds.merge_and_reinit(engine),
                    r"LoRA parameters .* are not in the engine's optimizer")
            refused(f"stage {stage}: prune", lambda: relora_ds.prune_optimizer_state(engine, lora),
                    r"LoRA parameters .* are not in the engine's optimizer")
        engine.destroy()
    # Wrapped in the right order, one LoRA factor frozen by the user: no optimizer state, never trains; named as
    # frozen, not as a late wrap.
    for stage in (0, 2, 3):
        model = relora_ds.wrap(tiny_llama(), rank=4)
        next(p for n, p in model.named_parameters() if n.endswith("lora_B")).requires_grad_(False)
        engine = tiny_engine(model, stage)
        try:
            relora_ds.merge_and_reinit(engine)
        except ValueError as e:
            assert re.search(r"^merge_and_reinit: 1 LoRA parameters \(model.layers.0.self_attn.q_proj.lora_B, ...\) "
                             r"are frozen \(requires_grad=False\).*leave it out of wrap's target_modules$", str(e)), e
            print(f"frozen stage {stage}: refused", flush=True)
        engine.destroy()
    # Wrapped in the right order, but merged inside a gradient accumulation (1 of 2 micro-steps done): named.
    engine = tiny_engine(relora_ds.wrap(tiny_llama(), rank=4), 2, accumulation=2)
    x = torch.randint(0, 128, (1, 9))
    engine.backward(engine(x, labels=x).loss)
    engine.step()  # not a boundary: no optimizer step
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        relora_ds.merge_and_reinit(engine)
    assert any("inside a gradient accumulation (1 of 2 micro-steps done)" in str(w.message) for w in seen), seen
    print("accumulation: merge warned", flush=True)
    engine.destroy()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
