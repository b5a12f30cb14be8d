"""relora_ds/memory.py's formulas (launch/memory_table.py prints them) against the model: parameter counts against the module, the kept
activations against autograd's saved tensors, and the peak activation memory (with and without activation
checkpointing) against the heap actually in use on CPU; the offloaded states against DeepSpeed's own estimators."""
import ctypes
import gc
import json
import re
import subprocess
import sys

import pytest
import torch

from launch_utils import ROOT
from relora_ds import LlamaConfig, LlamaForCausalLM, lora_parameters, wrap

sys.path.insert(0, str(ROOT / "launch"))
import memory_table  # noqa: E402
from relora_ds import memory  # noqa: E402


def test_memory_table_parameter_counts_match_the_model():
    for name, rank in [("tiny", 32), ("60m", 128)]:
        cfg = LlamaConfig.preset(name)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        c = memory.param_counts(cfg, rank)
        assert c["projections"] + c["other"] == model.num_parameters()
        with torch.device("meta"):
            wrap(model, rank=rank)
        assert c["lora"] == sum(p.numel() for p in lora_parameters(model))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_frozen_bytes_match_the_wrapped_model(quantize):
    """Device bytes of the frozen base as the layers really hold it (the int8 host residual excluded)."""
    cfg = LlamaConfig.preset("tiny")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    wrap(model, rank=8, quantize=quantize)
    def held(tensors):
        return sum(t.untyped_storage().nbytes() for n, t in tensors
                   if n.endswith((".weight", ".weight_q", ".weight_scale")) and "proj" in n and not t.requires_grad)

    # (parameters, which ZeRO-3 partitions; buffers, which it does not)
    want = (held(model.named_parameters()), held(model.named_buffers()))
    assert memory.frozen_bytes(memory.param_counts(cfg, 8), quantize) == want
    assert want[0] > 0 and (want[1] > 0) == (quantize == "int8")


@pytest.mark.parametrize("rank", [None, 16])
def test_kept_activations_match_saved_tensors(rank):
    """What autograd saves in the forward (one count per storage) equals the formula's kept part."""
    _check_kept(LlamaConfig.preset("tiny", attn_implementation="sdpa"), rank)


@pytest.mark.parametrize("variant", ["dropout", "dropout_int8", "qk_norm"])
def test_kept_dropout_masks_and_qk_norms_match_saved_tensors(variant):
    """The terms launch/preflight.py's estimate adds (memory.run_phases): the LoRA dropout's keep-masks,
    1 byte per element of each adapted projection's input on the BLAS path, 3 where an int8 base under dropout
    falls back to the twin (its dropped-out bf16 copy too); and Qwen3's q/k norms (qk_norm_bytes)."""
    cfg = LlamaConfig.preset("tiny", attn_implementation="sdpa", **(
        dict(model_type="qwen3", qk_norm=True) if variant == "qk_norm" else {}))
    per_byte = 3 if variant == "dropout_int8" else 1
    masks = per_byte * 128 * (6 * cfg.hidden_size + cfg.intermediate_size) if variant != "qk_norm" else 0
    _check_kept(cfg, 16, extra=masks, dropout=0.1 if masks else 0.0,
                quantize="int8" if variant == "dropout_int8" else None)


def test_qk_norms_of_grouped_query_attention_keep_q_and_k_at_their_own_head_counts():
    """Qwen3's q/k norms with fewer key/value heads than query heads (tiny with 2 kv heads of its 4): what
    autograd saves with them minus the same LLaMA without them is qk_norm_bytes per layer, counting k's norm
    over the kv heads (the saved tensors are the oracle, exactly: 6 bytes an element and the 4-byte reciprocal
    RMS of each head's row; counting 2 x the query heads is a third more)."""
    def saved_bytes(qk_norm):
        cfg = LlamaConfig.preset("tiny", attn_implementation="sdpa", num_key_value_heads=2,
                                 **(dict(model_type="qwen3", qk_norm=True) if qk_norm else {}))
        return _saved_bytes(cfg, 0, 2, 128), cfg
    (with_norms, cfg), (without, _) = saved_bytes(True), saved_bytes(False)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert with_norms - without == 2 * cfg.num_hidden_layers * memory.qk_norm_bytes(cfg, 128)


def _saved_bytes(cfg, rank, b, s, **wrap_kw):
    """Bytes of the tensors autograd saves in a bf16 forward of b sequences of s tokens (one count per storage;
    the parameters not counted)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if rank:
        wrap(model, rank=rank, **wrap_kw)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(saved.values())


def _check_kept(cfg, rank, extra=0, **wrap_kw):
    assert _saved_bytes(cfg, rank, 2, 128, **wrap_kw) == pytest.approx(
        2 * memory.kept_activation_bytes(cfg, 128, rank, extra=extra), rel=0.01)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not taken back (arena chunks + mmapped chunks). torch's CPU
    allocator does not cache, so every tensor's memory is in here from allocation until its free."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def measure_activations(cfg, rank, b, s, chunk_size):
    """{(checkpointing, chunked): (bytes in use after the forward, peak bytes during backward)}, above the idle
    model with its grads, for the four combinations on one model, and on the full logits: checkpointing only the
    first layer ("first_layer"), and the selective policy on every layer and on the first one only.

    The peak is sampled before and after every autograd node and every module call (the recomputed
    forward of checkpointing included), so it sees the state after each op's outputs exist. It does not
    see inside one node: the chunked loss's per-chunk logits (tests/test_loss.py bounds those).
    Before the first case: one plain pass allocates the gradients, and the chunked head alone runs once, since
    the first pass at a shape keeps memory that later ones reuse (5 MB on a 27 MB case, measured with an
    8-token warm-up; likely oneDNN's per-shape buffers, not traced), so every measured op runs at a shape seen
    before; and one checkpointed pass on 8 tokens, whose first use imports torch's compiler stack (813
    modules, 36 MB of heap, measured)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if rank:
        wrap(model, rank=rank)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], _heap_in_use())
    for m in model.modules():
        m.register_forward_pre_hook(sample)
        m.register_forward_hook(sample)
    model(ids, labels=ids).loss.backward()  # gradients exist from here on: not activations
    model.gradient_checkpointing_enable()
    model(ids[:1, :8], labels=ids[:1, :8]).loss.backward()
    h = torch.randn(b * (s - 1), cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    model.lm_head(h, targets=ids[:, 1:].reshape(-1), chunk_size=chunk_size).backward()
    del h
    out = {}
    for chunked in (False, True):
        model.chunked_loss_enable(chunk_size) if chunked else model.chunked_loss_disable()
        for checkpointing in CHECKPOINTING:
            if chunked and checkpointing not in ("none", "all"):
                continue
            if checkpointing == "none":
                model.gradient_checkpointing_disable()
            else:
                model.gradient_checkpointing_enable(num_layers=1 if checkpointing.endswith("first_layer") else None,
                                                    policy="selective" if "selective" in checkpointing else "full")
            gc.collect()
            base = _heap_in_use()
            loss = model(ids, labels=ids).loss
            kept = _heap_in_use() - base
            seen, todo = set(), [loss.grad_fn]
            while todo:
                node = todo.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                node.register_prehook(sample)
                node.register_hook(sample)
                todo.extend(f for f, _ in node.next_functions)
            peak[0] = 0
            loss.backward()
            del loss, seen, todo, node
            out[checkpointing, chunked] = (kept, peak[0] - base)
    return out


# vocab 64: a layer's activations dominate the transient; vocab 4096: the logits do (63% of the formula's peak).
# (8192, 78% of it, and 2048 passed too; the fixture measured 124 s with 8192, 78 s with 4096, on 2 AVX2 cores.)
VOCABS, B, S, RANK, CHUNK = (64, 4096), 4, 256, 16, 128
# which layers recompute and how, and what relora_ds.memory takes for it (recomputed_layers, policy)
CHECKPOINTING = {"none": (False, "full"), "all": (True, "full"), "first_layer": (1, "full"),
                 "selective": (True, "selective"), "selective_first_layer": (1, "selective")}


@pytest.fixture(scope="module")
def measured():
    """Every case of test_peak_activations_match_the_heap, measured in one fresh process: after hundreds of
    tests the suite's heap is fragmented, and mallinfo2 (which walks malloc's free lists at every sample)
    made each case 2-3x slower than alone (measured 29 s vs 11 s). One model per vocab serves its 4 cases
    (one warm-up pass, not 4). The tiny preset's width on 2 of its 4 layers: the per-layer terms are the same,
    the compute half (bf16 matmuls take a slow fallback on a CPU without AVX512/AMX)."""
    code = ("import json, sys; sys.path[:0] = sys.argv[1:3]\n"
            "from test_memory_table import measure_activations, VOCABS, B, S, RANK, CHUNK\n"
            "from relora_ds import LlamaConfig\nout = {}\n"
            "for vocab in VOCABS:\n"
            "    cfg = LlamaConfig.preset('tiny', attn_implementation='sdpa', vocab_size=vocab, num_hidden_layers=2)\n"
            "    for (ckpt, chunked), m in measure_activations(cfg, RANK, B, S, CHUNK).items():\n"
            "        out[f'{ckpt}-{chunked}-{vocab}'] = m\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(ROOT / "launch")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("checkpointing, chunked", [("none", False), ("all", False), ("first_layer", False),
                                                    ("selective", False), ("selective_first_layer", False),
                                                    ("none", True), ("all", True)])
def test_peak_activations_match_the_heap(measured, checkpointing, chunked, vocab):
    cfg = LlamaConfig.preset("tiny", attn_implementation="sdpa", vocab_size=vocab, num_hidden_layers=2)
    b, s, rank = B, S, RANK
    label, (checkpointing, policy) = checkpointing, CHECKPOINTING[checkpointing]
    kept, peak = measured[f"{label}-{chunked}-{vocab}"]
    # Beyond the formula: graph nodes, RoPE tables, labels (< 0.5 MB here, per batch not per sequence).
    slack = 0.5e6
    weight_grad = 4 * cfg.vocab_size * cfg.hidden_size if chunked else 0
    assert kept == pytest.approx(b * memory.kept_activation_bytes(cfg, s, rank, checkpointing, chunked, policy)
                                 + weight_grad, rel=0.03, abs=slack)
    # The chunked loss's per-chunk logits (6 c V) live inside one autograd node, where the sampling cannot see
    # (tests/test_loss.py bounds them); with a 1-token chunk the formula leaves them out and keeps the rest.
    want = memory.activation_peak_bytes(cfg, s, rank, b, checkpointing, 1 if chunked else 0, policy)
    # Measured 0.95-1.02x the formula: backward's own gradient buffers come and go around these terms
    # (README.md, "Sizing micro-batch and ZeRO stage", quotes this tolerance).
    assert peak == pytest.approx(want, rel=0.07, abs=slack)
    if label == "all" and not chunked and vocab == 64:  # what it saves is real: the layers' activations are gone
        assert peak < 0.6 * memory.activation_peak_bytes(cfg, s, rank, b)
    kept_none, kept_all = (measured[f"{c}-False-{vocab}"][0] for c in ("none", "all"))
    if label == "first_layer":  # one of the two layers: between none and all, and not at either end
        assert kept_all + 0.3 * (kept_none - kept_all) < kept < kept_none - 0.3 * (kept_none - kept_all)
    if label == "selective":  # the layers keep about half of what they keep without checkpointing
        assert kept_all + 0.3 * (kept_none - kept_all) < kept < kept_none - 0.3 * (kept_none - kept_all)
        if vocab == 64:  # and the peak, while a layer recomputes, is still well below no checkpointing's
            assert peak < 0.85 * measured[f"none-False-{vocab}"][1]
    if label == "selective_first_layer":  # between selective everywhere and no checkpointing
        assert measured[f"selective-False-{vocab}"][0] < kept < kept_none
    if chunked and vocab == VOCABS[1]:  # and the logits' share is gone
        assert peak < 0.5 * memory.activation_peak_bytes(cfg, s, rank, b, checkpointing)


def test_memory_table_prints_every_preset():
    for extra in ([], ["--activation-checkpointing"]):
        proc = subprocess.run([sys.executable, "launch/memory_table.py", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "preset" not in line]
        assert [r.split("|")[1].strip() for r in rows] == list(memory_table.PRESETS)
    assert "activation checkpointing on" in proc.stdout


def _table(capsys, *argv) -> dict[str, dict[str, str]]:
    """memory_table.py's output as {preset: {column header: cell}}."""
    assert memory_table.main(list(argv)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


@pytest.mark.parametrize("argv, error", [
    (["--gpus", "0"], "argument --gpus: must be a positive whole number, got 0"),
    (["--gpus", "-2"], "argument --gpus: must be a positive whole number, got -2"),
    (["--global-batch-size", "0"], "argument --global-batch-size: must be a positive whole number, got 0"),
    (["--memory-gb", "nan"], "argument --memory-gb: must be a positive finite number, got nan"),
    (["--gpus", "7"], "--global-batch-size 1152 is not divisible by --gpus 7, so no micro-batch can be used "
                      r"\(.*\): use 6 or 8 GPUs, or a global batch of 1148 or 1155"),
    (["--gpus", "5", "--global-batch-size", "3"], "use 3 GPUs, or a global batch of 5"),
    (["--memory-gb", "2"], r"--memory-gb 2 leaves nothing usable after the reserve of 2.2 GiB"),
    (["--dropout", "1"], r"--dropout must be in \[0, 1\) \(0: none\), got 1"),
])
def test_bad_gpu_counts_are_named(capsys, argv, error):
    """--gpus 0 used to divide by zero; --gpus 7 printed "= 0 that fits" and micro-batches no run can use."""
    with pytest.raises(SystemExit) as e:
        memory_table.main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and "|" not in out.out
    assert re.search(error, out.err), out.err


@pytest.mark.parametrize("gpus, dropout", [(1, None), (12, None), (16, None), (8, "0")])
def test_micro_batches_are_the_largest_fitting_divisors(capsys, gpus, dropout):
    """Every micro-batch divides the per-rank batch (the trainer's batch arithmetic) and is the largest
    divisor whose states + activations fit: 16 GPUs, 1b warm start at ZeRO-0 is 24 (36 x 1.35 GB does not
    fit in the 48.5 GB its 21.4 GB of states leave). The ReLoRA phase also keeps the LoRA dropout's masks
    (default 0.1, the paper recipes'), 1 byte per element of the 7 projections' inputs (a review found the
    table's 1b micro-batch of 48 refused by preflight for paper_1b.yaml, which the masks make 36)."""
    rows = _table(capsys, "--gpus", str(gpus), *(["--dropout", dropout] if dropout else []))
    per_rank = 1152 // gpus
    budget = 80e9 - (0.1 * 80e9 + 2 * memory.GIB)
    for name, row in rows.items():
        cfg = LlamaConfig.preset(name, vocab_size=32000)
        c = memory.param_counts(cfg, 128)
        for phase, stages, trainable, frozen, rank in (
                ("warm start", range(4), c["projections"] + c["other"], (0, 0), None),
                ("ReLoRA", (0, 2, 3), c["lora"] + c["other"], memory.frozen_bytes(c, None), 128)):
            cells = row[f"micro-batch {phase} {' / '.join(f'Z{z}' for z in stages)}"].split(" / ")
            for z, cell in zip(stages, cells):
                states = memory.state_bytes(trainable, frozen, z, gpus)

                masks = 512 * (6 * cfg.hidden_size + cfg.intermediate_size) if rank and not dropout else 0

                def fits(mb):
                    return states + memory.activation_peak_bytes(cfg, 512, rank, mb, extra=masks) <= budget
                usable = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and fits(d)]
                assert cell == (str(max(usable)) if usable else "-"), (name, phase, z, cell, usable)
    if gpus == 16:
        assert rows["1b"]["micro-batch warm start Z0 / Z1 / Z2 / Z3"].startswith("24 / ")
    if gpus == 8:  # no dropout: no masks
        assert rows["1b"]["micro-batch ReLoRA Z0 / Z2 / Z3"] == "36 / 48 / 48"


def test_readme_sizing_tables_are_the_scripts_output(capsys):
    """Every cell of the README's sizing tables, against memory_table.py run with the table's options."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### Sizing micro-batch and ZeRO stage on 80 GB GPUs")
    section = text[start:text.index("\n### ", start + 1)]
    tables, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    options = [[], ["--gpus", "16"], ["--activation-checkpointing"],
               ["--activation-checkpointing", "--activation-checkpointing-policy", "selective"],
               ["--activation-checkpointing", "--loss-chunk-size", "1024"]]
    assert len(tables) == len(options)
    for table, argv in zip(tables, options):
        want = _table(capsys, *argv)
        header = table[0]
        for cells in table[2:]:
            assert dict(zip(header, cells)) == {h: want[cells[0]][h] for h in header}, (argv, cells[0])


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_offloaded_states_match_deepspeeds_own_estimates(gpus):
    """GPU and host bytes with the optimizer (and the parameters) offloaded, against DeepSpeed's
    estimate_zero{2,3}_model_states_mem_needs for an all-trainable model (the full-rank warm start), minus
    what the table leaves to --reserve-gb: ZeRO-3's largest-layer working set (4 bytes per parameter of
    it) and the 1.5x host buffer factor. One node of `gpus` GPUs (DeepSpeed counts host memory per node)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = LlamaConfig.preset("1b", vocab_size=32000)
    c = memory.param_counts(cfg, 128)
    T = c["projections"] + c["other"]
    largest = cfg.vocab_size * cfg.hidden_size  # the embedding (and the head) is this model's largest layer
    _, gpu = estimate_zero2_model_states_mem_needs(T, gpus, 1, cpu_offload=True)
    assert memory.state_bytes(T, (0, 0), 2, gpus, "optimizer") == gpu
    for params, offload in ((False, "optimizer"), (True, "optimizer+parameters")):
        host, gpu, working = estimate_zero3_model_states_mem_needs(T, largest, gpus, 1, cpu_offload=True,
                                                                   cpu_offload_params=params, zero_init=True)
        assert working == 4 * largest
        assert memory.state_bytes(T, (0, 0), 3, gpus, offload) == pytest.approx(gpu - working, abs=1)
        assert gpus * memory.host_state_bytes(T, (0, 0), 3, gpus, offload) == pytest.approx(host / 1.5,
                                                                                                     rel=1e-12)
    # Frozen weights (the ReLoRA base): kept on the GPU (partitioned at ZeRO-3) unless the parameters are
    # offloaded; int8's per-row scales are buffers, which stay on the GPU in every case.
    frozen = memory.frozen_bytes(c, "int8")
    assert memory.state_bytes(0, frozen, 2, gpus, "optimizer") == frozen[0] + frozen[1]
    assert memory.state_bytes(0, frozen, 3, gpus, "optimizer") == frozen[0] / gpus + frozen[1]
    assert memory.state_bytes(0, frozen, 3, gpus, "optimizer+parameters") == frozen[1]
    assert memory.host_state_bytes(0, frozen, 3, gpus, "optimizer+parameters") == frozen[0] / gpus
    # The parameters alone (no DeepSpeed estimator; hand-computed): the bf16 partitions, frozen ones included,
    # leave the GPU (2 T/N + frozen/N of ZeRO-3's 16 T/N + frozen/N), and nothing else; the host holds just them.
    both = (T, frozen)
    assert memory.state_bytes(*both, 3, gpus, "parameters") == 14 * T / gpus + frozen[1]
    assert memory.state_bytes(*both, 3, gpus, "none") - memory.state_bytes(*both, 3, gpus, "parameters") == \
        pytest.approx((2 * T + frozen[0]) / gpus)
    assert memory.host_state_bytes(*both, 3, gpus, "parameters", residual=5) == (2 * T + frozen[0]) / gpus + 5


@pytest.mark.parametrize("stage, offload, error", [
    (0, "optimizer", "offload='optimizer' needs ZeRO stage 1 or 2 or 3, got stage 0"),
    (2, "optimizer+parameters", "offload='optimizer\\+parameters' needs ZeRO stage 3, got stage 2"),
    (2, "parameters", "offload='parameters' needs ZeRO stage 3, got stage 2"),
    (3, "nvme", "offload='nvme' is not valid: use one of none, optimizer, parameters, optimizer\\+parameters"),
])
def test_offload_at_a_stage_deepspeed_refuses_is_an_error(stage, offload, error):
    with pytest.raises(ValueError, match=error):
        memory.state_bytes(1000, (0, 0), stage, 8, offload)


def test_offload_table_cells(capsys):
    """The --offload table: n/a where DeepSpeed cannot offload, the GPU-side states elsewhere, and the host
    column (start-up fp32 model below ZeRO-3, offloaded warm-start and ReLoRA states), hand-computed for 1b on 8 GPUs."""
    c = memory.param_counts(LlamaConfig.preset("1b", vocab_size=32000), 128)
    T, t = c["projections"] + c["other"], c["lora"] + c["other"]
    F = 2 * c["projections"]  # the bf16 base
    row = _table(capsys, "--offload", "optimizer", "--presets", "1b")["1b"]
    # ZeRO-1 keeps the full bf16 gradients on the GPU until the accumulation boundary (stage_1_and_2.py).
    assert row["states/GPU warm start Z0 / Z1 / Z2 / Z3 (GB)"] == \
        f"n/a / {4 * T / 1e9:.1f} / {2 * T / 1e9:.1f} / {2 * T / 8 / 1e9:.1f}"
    assert row["states/GPU ReLoRA Z0 / Z2 / Z3 (GB)"] == f"n/a / {(2 * t + F) / 1e9:.1f} / {(2 * t + F) / 8 / 1e9:.1f}"
    assert row["micro-batch warm start Z0 / Z1 / Z2 / Z3"].startswith("n/a / ")
    assert row["host RAM/GPU start-up below Z3 / warm start / ReLoRA (GB)"] == \
        f"{4 * T / 1e9:.1f} / {16 * T / 8 / 1e9:.1f} / {16 * t / 8 / 1e9:.1f}"
    row = _table(capsys, "--offload", "optimizer+parameters", "--presets", "1b")["1b"]
    assert row["states/GPU ReLoRA Z0 / Z2 / Z3 (GB)"] == "n/a / n/a / 0.0"
    assert row["host RAM/GPU start-up below Z3 / warm start / ReLoRA (GB)"] == \
        f"0.0 / {18 * T / 8 / 1e9:.1f} / {(18 * t + F) / 8 / 1e9:.1f}"  # ZeRO-3 only: built partitioned
    # An int8 base keeps its merge residual (1 byte per frozen parameter) whole on every rank's host.
    row = _table(capsys, "--quantize", "int8", "--presets", "1b")["1b"]
    assert row["host RAM/GPU start-up below Z3 / warm start / ReLoRA (GB)"] == f"{4 * T / 1e9:.1f} / 0.0 / {F / 2 / 1e9:.1f}"
    default = _table(capsys, "--presets", "1b")["1b"]  # the default table has no host column and no n/a
    assert not any(h.startswith("host RAM") for h in default) and "n/a" not in " ".join(default.values())


def test_bad_reserve_and_rank_are_named_and_presets_may_be_comma_separated(capsys):
    for argv, match in ((["--reserve-gb", "-5"], r"--reserve-gb must be in \[0, 74.5\) GiB"),
                        (["--reserve-gb", "100"], r"--reserve-gb must be in \[0, 74.5\) GiB"),
                        (["--presets", "60m", "--rank", "100000"],
                         r"--rank 100000 is larger than 60m's smallest targeted layer dimension 512")):
        with pytest.raises(SystemExit) as e:
            memory_table.main(argv)
        assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
    assert memory_table.main(["--presets", "60m,130m"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["60m", "130m"]


def test_a_loss_chunk_holds_at_most_the_micro_batchs_tokens(capsys):
    """relora_ds/loss.py slices the micro-batch's B*s tokens: a chunk larger than that costs what the whole
    micro-batch costs. At 1b (seq 512, no LoRA dropout), a chunk of 100,000 tokens and one of 48 x 512 = 24,576
    fit the same micro-batches (the table charged 6 c V for the full 100,000 and printed 36 for 48)."""
    cfg = LlamaConfig.preset("1b", vocab_size=32000)
    assert memory.activation_peak_bytes(cfg, 512, 128, 48, False, 100_000) == \
        memory.activation_peak_bytes(cfg, 512, 128, 48, False, 48 * 512)
    assert memory.activation_peak_bytes(cfg, 512, 128, 1, False, 100_000) == \
        memory.activation_peak_bytes(cfg, 512, 128, 1, False, 512)
    big, exact = (_table(capsys, "--presets", "1b", "--dropout", "0", "--loss-chunk-size", str(c))["1b"]
                  for c in (100_000, 24_576))
    assert big == exact and big["micro-batch ReLoRA Z0 / Z2 / Z3"] == "48 / 48 / 48"


def test_recomputing_some_layers_sizes_micro_batches_between_none_and_all(capsys):
    """--activation-checkpointing-layers N: at 1b (24 layers) on 8 GPUs, the ReLoRA micro-batches with 12 layers
    recomputed lie between those without checkpointing and with every layer's, and N at or above the layer
    count is every layer; the header says which. Without --activation-checkpointing it is an error."""
    def micro_batches(*argv):
        row = _table(capsys, "--presets", "1b", *argv)["1b"]
        return [int(m) for m in row["micro-batch ReLoRA Z0 / Z2 / Z3"].replace("-", "0").split(" / ")]

    none, half = micro_batches(), micro_batches("--activation-checkpointing", "--activation-checkpointing-layers", "12")
    every = micro_batches("--activation-checkpointing")
    assert all(n <= h <= e for n, h, e in zip(none, half, every)) and none != half != every, (none, half, every)
    assert micro_batches("--activation-checkpointing", "--activation-checkpointing-layers", "24") == every
    assert micro_batches("--activation-checkpointing", "--activation-checkpointing-layers", "99") == every
    memory_table.main(["--presets", "1b", "--activation-checkpointing", "--activation-checkpointing-layers", "12"])
    assert "activation checkpointing on (at most the first 12 layers)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        memory_table.main(["--activation-checkpointing-layers", "12"])
    assert "--activation-checkpointing-layers needs --activation-checkpointing" in capsys.readouterr().err


def test_an_int8_base_under_dropout_counts_the_twins_masks(capsys):
    """--quantize int8 with the default dropout (0.1): an int8 base under dropout runs the torch twin on the
    kernels' default path (memory.run_phases), whose masks are 3 bytes per input element, not 1: the ReLoRA
    activations cell (1b, 512 tokens: 0.43 GB apart) is activation_phases with those masks."""
    cfg = LlamaConfig.preset("1b", vocab_size=32000)
    want = {twin: max(p for p, _ in memory.activation_phases(
        cfg, 512, 128, extra=memory.dropout_mask_bytes(cfg, 512, twin=twin))) / 1e9 for twin in (False, True)}
    assert want[True] - want[False] > 0.4
    row = _table(capsys, "--presets", "1b", "--quantize", "int8")["1b"]
    assert row["activations per seq. full / ReLoRA (GB)"].split(" / ")[1] == f"{want[True]:.2f}"


def test_memory_formulas_a_mutation_audit_left_unpinned():
    """Hand counts from activation_phases' docstring for a model whose last-kept-layer phase is the peak (V < h):
    that layer's backward holds everything kept but the loss's buffers, plus 8 s h of gradients in flight (a
    mutant keeping the loss's buffers moved the heap test's predictions by 1.8%, inside its tolerance); and
    launch/memory_table.py's one --activation-checkpointing-layers N for every preset: N above a preset's layer
    count recomputes all of them (a mutant without the clamp counted negative kept layers: activations
    0.03 GB for 0.20)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512)
    s, h, V, i, r, L = 128, 256, 64, 512, 16, 2
    layer = 24 * s * h + 8 * s * i + 14 * s * r
    for chunk, head in ((0, 4 * s * V), (32, 2 * s * h)):
        kept = L * layer + 8 * s * h + head
        assert memory.kept_activation_bytes(cfg, s, r, chunked_loss=bool(chunk)) == kept
        assert memory.activation_phases(cfg, s, r, loss_chunk_size=chunk)[1] == (kept - head + 8 * s * h, 0)
        if not chunk:
            assert memory.activation_peak_bytes(cfg, s, r, 1) == kept - head + 8 * s * h
    assert memory.recomputed_layers(cfg, 100) == 2
    for policy in ("full", "selective"):
        assert memory.kept_activation_bytes(cfg, 128, 16, 100, policy=policy) == \
            memory.kept_activation_bytes(cfg, 128, 16, True, policy=policy)
        assert memory.activation_peak_bytes(cfg, 128, 16, 2, 100, policy=policy) == \
            memory.activation_peak_bytes(cfg, 128, 16, 2, True, policy=policy)
