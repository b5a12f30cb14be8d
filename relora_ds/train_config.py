"""Run configuration: one dataclass, filled from a YAML recipe (``--config``) and CLI overrides (read in
``train_args.py``); each value coerced to its field's type and the whole checked here.

Every field's help text is its ``metadata["help"]`` and shows in ``launch/train.py --help``. Each setting
has one home: batch sizes, optimizer hyperparameters, gradient clipping and the schedule live here; the
DeepSpeed JSON holds only the engine's own settings (ZeRO stage, offload, precision, communication) and a
value given in both places is an error, never silently resolved (see ``ds_config.py``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field

from .config_values import Problems, coerce_value
from .model_config import PRESETS

_MAX_TIMEOUT_MIN = 60 * 24 * 366
BUILTIN_VOCAB_SIZE = 2048
# The built-in corpus's smallest SentencePiece model: byte fallback (256 pieces), <unk>, <s>, </s> and a piece for
# each of the corpus's characters SentencePiece keeps (its training refuses fewer: 338, tests/test_preflight.py).
_MIN_BUILTIN_VOCAB = 338
_MAX_BUILTIN_VOCAB = 2**31 - 1  # SentencePiece reads vocab_size as a 32-bit int (2**31: "cannot parse as int")
# data_prefetch: each micro-batch read ahead has its own reader thread; far more failed the first step with
# "RuntimeError: can't start new thread" (1e8, measured), after the model was built.
_MAX_PREFETCH = 256
# Fields holding a path, whose leading "~" is expanded.
_PATH_FIELDS = ("output_dir", "data_dir", "hf_model", "warm_start_from")
ALL_LINEAR = "all-linear"  # target_modules: every linear layer but the output layer (PEFT's spelling)


class PlainWarning(UserWarning):
    """A warning about the user's input that the launch scripts print as one ``warning: ...`` line."""


class ConfigWarning(PlainWarning):
    """A setting that is ignored, capped or likely a mistake; the run goes on. The launch scripts print
    these as one ``warning: ...`` line (``show_config_warnings_plainly``)."""


def show_config_warnings_plainly() -> None:
    """Print ConfigWarnings and DataWarnings (PlainWarning) as ``warning: <message>``, without a source
    location (it would point into the dataclass machinery or the data pipeline, not at the recipe or the
    input); other warnings keep Python's format."""
    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, PlainWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # Model
    model: str | None = _f("tiny", "model preset (debug, tiny, 60m, 130m, 250m, 350m, 1b, 3b, 7b); recorded as "
                                   "None where hf_model or warm_start_from gives the model")
    hf_model: str | None = _f(None, "Hugging Face LLaMA, Qwen2, Qwen3 or Mistral directory to start from (continued "
                                    "pre-training); the model is its config.json: a recipe's model is ignored, --model with it "
                                    "is an error")
    seq_len: int = _f(256, "tokens per training sequence (windows of seq_len+1 tokens are read)")
    # ReLoRA
    mode: str = _f("relora", "relora (merges + resets), lora (no restarts: the paper's baseline) or full",
                   choices=("relora", "lora", "full"))
    rank: int = _f(128, "LoRA rank r")
    alpha: float = _f(32.0, "LoRA alpha; scale = alpha / rank")
    dropout: float = _f(0.0, "LoRA dropout on the input of the low-rank path")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "module names or suffixes to convert to ReLoRA layers, or all-linear (every "
                                   "linear layer but the output layer, PEFT's spelling); a recipe may also give "
                                   "one string, a regular expression the full module name must match (PEFT's "
                                   "meaning of a string)")
    quantize: str | None = _f(None, "store the frozen base of ReLoRA layers in int8 (per-channel scales, "
                                    "drift-free merges; relora_ds/quant.py); default: the model dtype",
                              choices=("int8",))
    merge_residual: bool = _f(False, "keep what each merge's rounding into a bf16/fp16 base drops (bf16 in host "
                                     "memory, 2 bytes per base parameter) and add it back at the next merge, so "
                                     "frequent small merges (merge_every) are not lost; float bases only")
    cycle_length: int | None = _f(None, "steps between optimizer resets (the paper: 5000); required for relora")
    merge_every: int | None = _f(None, "steps between merges (online ReLoRA merges more often than it "
                                        "resets); default: cycle_length")
    restart_warmup_steps: int = _f(100, "steps of linear LR re-warmup after each reset")
    prune_method: str = _f("magnitude", "optimizer-state pruning at a reset",
                           choices=("magnitude", "random", "reset"))
    prune_ratio: float = _f(0.99, "fraction of each LoRA Adam moment zeroed at a reset")
    kernels: str | None = _f(None, "ReLoRA layer and merge implementation (relora_kernels): auto, triton, torch or "
                                   "reference; sets RELORA_KERNELS for the run (a different RELORA_KERNELS in the "
                                   "environment is an error); default: that environment variable, else auto", choices=("auto", "triton", "torch", "reference"))
    prune_joint: bool = _f(False, "one mask, from |exp_avg|, for both Adam moments; default: each moment by its own "
                                  "magnitudes (the paper), with exp_avg also zeroed where exp_avg_sq is (an entry "
                                  "keeping momentum without its second moment would move by lr*m/eps); random "
                                  "pruning always draws one mask for both")
    warm_start_steps: int = _f(0, "full-rank steps before switching to ReLoRA in the same run")
    warm_start_lr: float | None = _f(None, "peak lr of the full-rank warm start (the paper's ReLoRA lr is 2x "
                                           "the full-rank one); default: lr")
    lowrank_schedule: str = _f("continue", "LR schedule after an in-run warm start: continue (the switch is a reset: "
                                           "a restart_warmup_steps ramp back onto the run's one cosine) or restart "
                                           "(the reference implementation's second run: a fresh warmup_steps warmup "
                                           "and a jagged cosine over the remaining steps)",
                               choices=("continue", "restart"))
    warm_start_from: str | None = _f(None, "Hugging Face directory of a full-rank warm start (e.g. an "
                                           "export of another run); the ReLoRA run starts from it, and reads on "
                                           "in the data after the warm start's windows (see warm_start_data)")
    warm_start_data: str = _f("continue", "with warm_start_from, where the data starts: continue (after the "
                                          "windows the warm start trained on, read from the export's "
                                          "relora_ds_progress.json, where it is the same data, seq_len and "
                                          "seed; else from the beginning, with a warning where windows repeat) or "
                                          "restart (at the data's beginning: the warm start's windows come again)",
                              choices=("continue", "restart"))
    # Optimization
    lr: float = _f(1e-3, "peak learning rate (the paper uses 2x the full-rank lr for ReLoRA)")
    min_lr_ratio: float = _f(0.1, "final LR as a fraction of the peak (cosine floor)")
    warmup_steps: int = _f(100, "initial linear LR warmup")
    total_steps: int | None = _f(None, "optimizer steps to train (or give token_budget)")
    token_budget: int | None = _f(None, "training tokens; sets total_steps = ceil(budget / tokens per step)")
    weight_decay: float = _f(0.0, "AdamW weight decay, on the LoRA factors and the matrices trained full-rank "
                                  "(embeddings, head; every linear in a full-rank run)")
    decay_norms_and_biases: bool = _f(False, "weight decay on the norms' gains and the biases too, as the "
                                             "reference code decays every trainable parameter; default: none "
                                             "on these vectors (as Megatron-LM, nanoGPT, Hugging Face's Trainer)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 disables)")
    micro_batch_size: int = _f(8, "sequences per rank per forward/backward")
    global_batch_size: int = _f(8, "sequences per optimizer step over all ranks; must be a multiple of "
                                    "micro_batch_size x world size (the rest is gradient accumulation)")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations in backward: keeps "
                                               "only the layers' inputs (far less activation memory) for about "
                                               "one more forward pass of compute")
    activation_checkpointing_layers: int | None = _f(None, "with activation_checkpointing: recompute only the "
                                                           "first N decoder layers and keep the later layers' "
                                                           "activations (as Megatron-LM's --recompute-num-layers), "
                                                           "for a micro-batch between what no checkpointing and "
                                                           "checkpointing every layer fit; default: every layer")
    activation_checkpointing_policy: str = _f("full", "with activation_checkpointing: 'full' keeps only a recomputed "
                                                      "layer's input; 'selective' also keeps its matmul and "
                                                      "attention outputs (about half the layer's activations) "
                                                      "and recomputes only the cheap ops (norms, RoPE, SiLU, "
                                                      "residual adds, LoRA dropout, the rank-r products; "
                                                      "the Triton layer path keeps its whole forward): "
                                                      "torchtitan's op-level selective checkpointing",
                                              choices=("full", "selective"))
    loss_chunk_size: int = _f(0, "compute the loss this many tokens at a time through lm_head, never holding "
                                 "the full (tokens x vocab) logits (e.g. 1024); 0: plain logits")
    document_masking: bool = _f(False, "attention within each document of a packed window (a document ends at "
                                         "its EOS): no token attends to an earlier document; flash-attn's varlen "
                                         "kernel where flash-attn runs, else torch SDPA with a (batch, 1, "
                                         "seq_len+1, seq_len+1) mask (the model reads windows of seq_len+1 "
                                         "tokens)")
    compile: bool = _f(False, "torch.compile each decoder layer (one graph the layers share, as torchtitan): "
                              "fuses the norms, RoPE and the MLP's activation; the first step of each phase and "
                              "the first evaluation wait for the compile; under ZeRO-3 each layer's weights are "
                              "gathered at once, around its compiled forward")
    compile_backend: str = _f("inductor", "torch.compile's backend for --compile (torchtitan's compile.backend): "
                                          "inductor generates kernels; another of torch._dynamo.list_backends("
                                          "exclude_tags=()), e.g. aot_eager (AOTAutograd's graphs run eagerly: "
                                          "to tell a compile problem from a codegen one)")
    zero_init: bool = _f(True, "under ZeRO stage 3, build the model partitioned (deepspeed.zero.Init) and load "
                               "hf_model's or the warm start's weights into it a tensor at a time: no rank holds "
                               "the whole model; false: every rank builds it whole and DeepSpeed moves it to each "
                               "GPU before partitioning it, as at the other stages")
    # Data
    data_dir: str | None = _f(None, "prepared data dir (launch/prepare_data.py), or a weighted mixture of "
                                    "several (prepare_data.py --mix); default: the built-in corpus, prepared "
                                    "on first use")
    vocab_size: int | None = _f(None, f"SentencePiece vocab size when preparing the built-in corpus (default "
                                      f"{BUILTIN_VOCAB_SIZE}); with data_dir the data's tokenizer decides")
    data_prefetch: int = _f(2, "micro-batches each rank reads ahead on background threads while a step trains "
                               "(reading shuffled windows waits on storage until the page cache holds the data); "
                               "0: read each when the step needs it. Evaluation reads its batches ahead likewise. "
                               "The batches are the same either way")
    # Evaluation, checkpoints, logging
    eval_every: int = _f(100, "validation perplexity every N steps (and at the end); 0 disables")
    eval_windows: int = _f(10240, "validation windows (sequences) per evaluation: N spread evenly over the split, "
                                         "the same set on any number of ranks; default 10240; 0: the whole split")
    final_eval_windows: int | None = _f(None, "validation windows of the run's last evaluation, the number "
                                              "it reports (the reference's reads 100M tokens); default: "
                                              "eval_windows; 0: the whole split")
    save_every: int = _f(0, "checkpoint every N steps (and at the end); 0: only at the end")
    keep_last: int = _f(3, "checkpoints to keep (older ones are deleted; the warm start's is spared, see "
                           "keep_warm_start)")
    keep_warm_start: bool = _f(True, "checkpoint the last full-rank step of an in-run warm start (step "
                                     "warm_start_steps) and keep it past keep_last: where ablations start "
                                     "(launch/export.py it for --warm-start-from)")
    output_dir: str = _f("runs/default", "where checkpoints, metrics.jsonl, TensorBoard logs and the "
                                         "Hugging Face export go")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir")
    resume_from: str | None = _f(None, "continue from this checkpoint of output_dir (a tag, e.g. step_2000) instead "
                                       "of the latest, e.g. to go back before a loss spike; implies resume. The "
                                       "checkpoints after it move to checkpoints/rewound/ (kept). A requeued job "
                                       "repeating the command continues from the rewound run's own checkpoints")
    overwrite: bool = _f(False, "start a new run in an output_dir that holds one, deleting its checkpoints, "
                                "metrics, TensorBoard logs and export (without it, or --resume, that is an error)")
    export: bool = _f(True, "export the final model to output_dir/hf (the Hugging Face format of the model's "
                               "family: LLaMA, Qwen2, Qwen3 or Mistral)")
    export_dtype: str | None = _f(None, "dtype of the exported weights; default: the Hugging Face model's own "
                                        "(hf_model / warm_start_from), else float32 (the fp32 master weights, "
                                        "lossless)", choices=("float32", "bfloat16", "float16"))
    log_every: int = _f(1, "metrics line every N steps: the mean loss of its steps, the last one's lr and grad_norm")
    wandb_project: str | None = _f(None, "also log every metric and event to this Weights & Biases project (needs "
                                         "the wandb package; the run id is kept in output_dir, so a resumed or "
                                         "requeued job continues the same W&B run)")
    collective_timeout_min: int = _f(60, "minutes a rank waits in a collective before the job fails; DeepSpeed's "
                                         "10 can end a job while rank 0 alone converts a checkpoint for another "
                                         "world size or exports a large model")
    peak_tflops: float | None = _f(None, "per-GPU peak TFLOP/s for the mfu metric (default: the dense bf16/fp16 "
                                          "peak of A100, A800, H100, H200, H800 and L40S when training in bf16 or "
                                          "fp16; no mfu elsewhere)")
    seed: int = _f(0, "seed for init, data order, LoRA re-inits, each rank's LoRA dropout stream and random "
                      "pruning's masks")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        problems = Problems()
        spelled = self.target_modules[0] if isinstance(self.target_modules, list) and len(self.target_modules) == 1 \
            else self.target_modules
        if isinstance(spelled, str) and spelled.lower() == ALL_LINEAR:  # a recipe's string, the command line's list
            self.target_modules = ALL_LINEAR  # wrap's own spelling of it (relora_ds/targets.py)
        elif isinstance(spelled, list) and any(isinstance(t, str) and t.lower() == ALL_LINEAR for t in spelled):
            problems.add(f"target_modules={spelled!r}: {ALL_LINEAR} selects every linear layer but the output layer "
                         "and stands alone: give it without other names (a --target-modules given twice collects "
                         "the names of both)", "target_modules")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:  # a recipe's regex
            try:
                re.compile(self.target_modules)
            except re.error as e:
                problems.add(f"target_modules={self.target_modules!r} is not a valid regular expression ({e}); a "
                             "string is matched against full module names, a list holds names or dotted suffixes",
                             "target_modules")
        for f in dataclasses.fields(self):
            if f.name == "target_modules" and isinstance(self.target_modules, str):
                continue
            try:
                setattr(self, f.name, coerce_value(f.name, getattr(self, f.name), hints[f.name]))
            except ValueError as e:
                problems.add(str(e), f.name)
        problems.raise_if_any()  # the checks below compare values of their fields' types
        for name in _PATH_FIELDS:  # "~/runs/x" in a recipe or --output-dir=~/x (the shell expands no ~ there)
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
                # No home directory (HOME unset, a uid without a passwd entry): the run went into a folder named
                # "~" in the working directory (which a later `rm -rf ~` ...)
                if getattr(self, name).startswith("~"):
                    problems.add(f"{name}={value!r} starts with ~, but this process has no home directory to "
                                 "expand it to (HOME is unset): give the path in full", name)
        problems.raise_if_any()
        self.validate()

    def validate(self) -> None:
        """Every problem of the settings in one ValueError (a line each), so a recipe is fixed in one round;
        the ConfigWarnings only when there is none (a warning about a value that is an error is noise)."""
        problems, warned = Problems(), []
        self._check(problems, warned)
        problems.raise_if_any()
        for message in warned:
            warnings.warn(message, ConfigWarning, stacklevel=3)

    def _check(self, problems: Problems, warned: list[str]) -> None:
        bad = problems.add
        # The CLI enforces `choices` through argparse; a recipe (YAML) or a direct construction gets the same check.
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                optional = " (or none, the default)" if f.default is None else ""
                bad(f"{f.name}={value!r} is not valid; valid values: {', '.join(map(repr, choices))}{optional}",
                    f.name)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                bad(f"{f.name}={value} must be a finite number", f.name)
            # `--data-dir "$DIR"` with DIR unset: '' was read as unset, or as the cwd
            if isinstance(value, str) and not value.strip() and f.name != "target_modules" and problems.ok(f.name):
                unset = (f"give none (--{f.name.replace('_', '-')} none) or leave it out for the default"
                         if f.default is None else f"leave it out for the default {f.default!r}")
                bad(f"{f.name}={value!r} is empty: give a value, or {unset}", f.name)
        for name in ("micro_batch_size", "global_batch_size", "seq_len", "rank", "lr", "alpha", "adam_eps",
                     "vocab_size", "keep_last", "log_every", "total_steps", "token_budget", "peak_tflops",
                     "collective_timeout_min", "cycle_length", "merge_every", "warm_start_lr",
                     "activation_checkpointing_layers"):
            value = getattr(self, name)
            if value is not None and problems.ok(name) and value <= 0:
                bad(f"{name}={value} must be positive", name)
        for name in ("warmup_steps", "restart_warmup_steps", "warm_start_steps", "weight_decay", "grad_clip",
                     "eval_every", "save_every", "loss_chunk_size", "eval_windows", "final_eval_windows", "seed",
                     "data_prefetch"):
            if problems.ok(name) and (getattr(self, name) or 0) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0", name)
        if problems.ok("collective_timeout_min") and self.collective_timeout_min > _MAX_TIMEOUT_MIN:
            bad(f"collective_timeout_min={self.collective_timeout_min} is over a year ({_MAX_TIMEOUT_MIN} minutes; "
                "torch's timeout takes a datetime.timedelta, which overflows far above): a hung rank would hold the "
                "job for good", "collective_timeout_min")
        if problems.ok("seed") and self.seed >= 2**62:  # torch's generators take < 2**64, with the offsets added
            bad(f"seed={self.seed} must be below 2**62 = {2**62} (random pruning's seeds add offsets to it, and "
                "torch's generators take seeds below 2**64)", "seed")
        for name in ("dropout", "adam_beta1", "adam_beta2"):
            if problems.ok(name) and not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name}={getattr(self, name)} must be in [0, 1)", name)
        for name in ("prune_ratio", "min_lr_ratio"):
            if problems.ok(name) and not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"{name}={getattr(self, name)} must be in [0, 1]", name)
        if problems.ok("data_prefetch") and self.data_prefetch > _MAX_PREFETCH:
            bad(f"data_prefetch={self.data_prefetch} is too many: each micro-batch read ahead takes a reader thread "
                f"and its memory; give at most {_MAX_PREFETCH} (a few hide the storage's latency; 0 reads each "
                "batch when the step needs it)", "data_prefetch")
        vocab = self.vocab_size if self.data_dir is None else None  # the built-in corpus's tokenizer's
        if vocab is not None and vocab > _MAX_BUILTIN_VOCAB:
            bad(f"vocab_size={vocab} is too large: SentencePiece, which trains the built-in corpus's tokenizer, "
                f"takes at most 2**31 - 1 = {_MAX_BUILTIN_VOCAB} pieces (below that, one larger than the corpus "
                f"supports is capped, with a warning); default {BUILTIN_VOCAB_SIZE}", "vocab_size")
        elif vocab is not None and 0 < vocab < _MIN_BUILTIN_VOCAB:
            bad(f"vocab_size={vocab} is too small: the built-in corpus's tokenizer takes {_MIN_BUILTIN_VOCAB} pieces "
                f"(256 byte fallbacks, <unk>, <s>, </s> and its characters) before any merge; give at least that "
                f"(default {BUILTIN_VOCAB_SIZE})", "vocab_size")

        relora = self.mode == "relora"
        if relora and not self.cycle_length and problems.ok("cycle_length"):
            bad("mode=relora needs cycle_length (steps between optimizer resets, e.g. 5000); use mode=lora for LoRA "
                "without restarts", "cycle_length")
        cycle = self.cycle_length if relora and problems.ok("cycle_length") else None
        if cycle and self.merge_every is not None and problems.ok("merge_every") and cycle % self.merge_every:
            bad(f"merge_every={self.merge_every} must be a positive divisor of cycle_length={cycle} (every reset is "
                "also a merge)", "merge_every")
        if cycle == 1 and problems.ok("restart_warmup_steps") and self.restart_warmup_steps:
            bad(f"cycle_length=1 resets at every step, and with restart_warmup_steps={self.restart_warmup_steps} "
                "the step after a reset trains at lr 0: no low-rank step would train. Use a cycle of at least "
                "restart_warmup_steps + 1 steps (the paper: thousands)", "cycle_length")
        elif cycle == 1:
            warned.append("cycle_length=1 resets at every step: the LoRA factors' Adam moments are pruned after "
                          "every update (the paper resets every few thousand steps)")
        elif cycle and problems.ok("restart_warmup_steps") and self.restart_warmup_steps >= cycle:
            warned.append(f"restart_warmup_steps={self.restart_warmup_steps} is not shorter than a cycle "
                          f"(cycle_length={cycle}): the ramp is cut to the cycle's {cycle} steps, so the lr re-warms "
                          f"for the whole cycle and never reaches the cosine (at most {(cycle - 1) / cycle:.0%} of "
                          "it); use restart_warmup_steps < cycle_length")
        if (self.total_steps is None) == (self.token_budget is None):
            bad("give exactly one of total_steps and token_budget (got total_steps="
                f"{self.total_steps}, token_budget={self.token_budget}); on the command line, --total-steps none "
                "drops a recipe's total_steps", "total_steps", "token_budget")
        if self.warm_start_steps and self.warm_start_from and problems.ok("warm_start_steps"):
            bad("give warm_start_steps or warm_start_from, not both", "warm_start_steps", "warm_start_from")
        if self.hf_model and self.warm_start_from:
            bad(f"give hf_model or warm_start_from, not both (each names the Hugging Face directory the run starts "
                f"from; got hf_model={self.hf_model!r}, warm_start_from={self.warm_start_from!r})",
                "hf_model", "warm_start_from")
        source = self.hf_model or self.warm_start_from
        if source and self.model is not None:  # the directory's config.json is the model; the field records None
            if self.model != TrainConfig.model:
                warned.append(f"model={self.model!r} is ignored: {'hf_model' if self.hf_model else 'warm_start_from'}"
                              f"={source!r} decides the model (its config.json)")
            self.model = None
        if not source and self.model is None:
            bad("model=None needs hf_model or warm_start_from (a Hugging Face directory); else give a preset: "
                f"{', '.join(PRESETS)}", "model")
        elif not source and self.model not in PRESETS and problems.ok("model"):
            bad(f"model={self.model!r} is not a preset; valid presets: {', '.join(PRESETS)} (or hf_model / "
                "warm_start_from for a Hugging Face model)", "model")
        if self.warm_start_steps and self.mode == "full" and problems.ok("warm_start_steps"):
            bad(f"warm_start_steps={self.warm_start_steps} only makes sense with mode=relora or lora: mode=full "
                "trains full-rank throughout; set warm_start_steps to 0 (--warm-start-steps 0)", "warm_start_steps")
        if self.warm_start_lr is not None and not self.warm_start_steps and problems.ok("warm_start_lr"):
            # e.g. a recipe's warm start overridden by --warm-start-steps 0 or --mode full: say so, go on
            warned.append(f"warm_start_lr={self.warm_start_lr} is ignored: this run has no full-rank warm start "
                          f"(warm_start_steps={self.warm_start_steps}, mode={self.mode!r})")
        if self.warm_start_steps and self.mode != "full" and self.warm_start_lr is None:
            warned.append(f"the full-rank warm start runs at ReLoRA's lr={self.lr}: the paper's ReLoRA lr is 2x the "
                          "full-rank one, and a warm start at the full-rank lr measured better (BENCHMARKS.md); set "
                          "warm_start_lr (e.g. lr / 2)")
        if self.resume_from is not None and problems.ok("resume_from"):
            if re.fullmatch(r"step_\d+", self.resume_from):
                self.resume = True
            else:
                bad(f"resume_from={self.resume_from!r} is not a checkpoint tag: give one of the form step_N (the "
                    "folders in output_dir/checkpoints)", "resume_from")
        if self.resume and self.overwrite:
            bad("give resume or overwrite, not both (resume continues the run in output_dir, overwrite deletes it; "
                "the SLURM scripts always pass --resume: for a new run there, give a new output_dir)",
                "resume", "overwrite")
        if self.wandb_project is not None and problems.ok("wandb_project") and \
                importlib.util.find_spec("wandb") is None:
            bad(f"wandb_project={self.wandb_project!r} needs the wandb package, which is not installed (pip install "
                "wandb), or leave wandb_project unset", "wandb_project")
        if self.merge_residual and self.quantize == "int8":
            bad("merge_residual is for float bases: quantize=int8 already merges with its own error-feedback "
                "residual", "merge_residual")
        if self.quantize == "int8" and self.mode == "full":
            bad("quantize=int8 applies to the frozen base of mode=relora or lora, not mode=full", "quantize")
        self._warn_ignored(warned)

    def check_schedule(self, total_steps: int, warn: bool = True, cycle_start: int | None = None) -> None:
        """The LR schedule's settings against each other and ``total_steps`` (given, or token_budget's at the
        run's batch): every problem in one ValueError, each naming the change that fixes it, then (``warn``)
        the ConfigWarnings. Not part of construction, which allows a partial TrainConfig (e.g. for a memory
        estimate); the launch scripts check a recipe's right after it (train_args.config_from_args).
        ``cycle_start``: the reset the cycles count from (a resume's, from its checkpoint); a resume without it
        leaves the check that depends on it (a cycle shorter than the warmup) to the resume."""
        from .schedule import schedule_problems
        found, warned = schedule_problems(
            total_steps=total_steps, warm_start_steps=self.warm_start_steps, warmup_steps=self.warmup_steps,
            mode=self.mode, cycle_length=self.cycle_length, lowrank_schedule=self.lowrank_schedule,
            merge_every=self.merge_every, token_budget=None if self.total_steps else self.token_budget,
            cycle_start=cycle_start, resuming=self.resume)
        problems = Problems()
        for message, fields in found:
            problems.add(message, *fields)
        problems.raise_if_any()
        for message in warned if warn else ():
            warnings.warn(message, ConfigWarning, stacklevel=3)

    def _warn_ignored(self, warned: list[str]) -> None:
        """A ConfigWarning for each setting this run's mode or other settings leave without effect."""
        ignored = []
        if self.lowrank_schedule == "restart" and not (self.warm_start_steps and self.mode != "full"):
            ignored.append(("lowrank_schedule='restart'", "it restarts the schedule after an in-run warm start, "
                            f"and this run has none (warm_start_steps={self.warm_start_steps}, mode={self.mode!r})"))
        if self.warm_start_data != "continue" and not self.warm_start_from:
            ignored.append((f"warm_start_data={self.warm_start_data!r}", "it says where the data starts after a "
                            "warm_start_from export, and this run has none"))
        if self.mode != "relora":  # e.g. a ReLoRA recipe run with --mode lora or full: each setting it gives
            for name in ("cycle_length", "merge_every"):
                if getattr(self, name) is not None:
                    ignored.append((f"{name}={getattr(self, name)}", f"mode={self.mode!r} has no merges or resets"))
            for name, default in (("prune_method", TrainConfig.prune_method), ("prune_ratio", TrainConfig.prune_ratio)):
                if getattr(self, name) != default:
                    ignored.append((f"{name}={getattr(self, name)!r}", f"mode={self.mode!r} has no optimizer resets"))
        ramps = self.mode == "relora" or (self.mode == "lora" and self.warm_start_steps
                                           and self.lowrank_schedule == "continue")
        if self.restart_warmup_steps != TrainConfig.restart_warmup_steps and not ramps:
            ignored.append((f"restart_warmup_steps={self.restart_warmup_steps}",
                            f"mode={self.mode!r} has no resets" + (
                                " (mode='lora' re-warms only at the switch after an in-run warm start, with "
                                "lowrank_schedule='continue')" if self.mode == "lora" else "")))
        if self.mode == "full":
            for name, default in (("rank", TrainConfig.rank), ("alpha", TrainConfig.alpha),
                                  ("target_modules", _FIELD_DEFAULTS["target_modules"]), ("dropout", 0.0),
                                  ("prune_joint", False), ("merge_residual", False)):
                if getattr(self, name) != default:
                    ignored.append((f"{name}={getattr(self, name)!r}", "mode='full' has no LoRA layers"))
        elif self.mode == "lora":
            if self.merge_residual:
                ignored.append(("merge_residual=True", "mode='lora' never merges (its residual buffers still take "
                                "2 bytes per base parameter of host memory)"))
            if self.prune_joint:
                ignored.append(("prune_joint=True", "mode='lora' has no optimizer resets"))
        if self.mode == "relora" and self.prune_joint and self.prune_method != "magnitude":
            ignored.append(("prune_joint=True", f"prune_method={self.prune_method!r} draws no magnitude masks"
                            + (" (random pruning always uses one mask for both moments)"
                               if self.prune_method == "random" else " (a reset zeroes both moments whole)")))

        if self.activation_checkpointing_layers is not None and not self.activation_checkpointing:
            ignored.append((f"activation_checkpointing_layers={self.activation_checkpointing_layers}",
                            "activation_checkpointing is off (--activation-checkpointing turns it on)"))
        if self.activation_checkpointing_policy != "full" and not self.activation_checkpointing:
            ignored.append((f"activation_checkpointing_policy={self.activation_checkpointing_policy!r}",
                            "activation_checkpointing is off (--activation-checkpointing turns it on)"))
        if self.compile_backend != "inductor" and not self.compile:
            ignored.append((f"compile_backend={self.compile_backend!r}", "compile is off (--compile turns it on)"))
        for name in ("eval_windows", "final_eval_windows"):
            if getattr(self, name) != getattr(TrainConfig, name) and not self.eval_every:
                ignored.append((f"{name}={getattr(self, name)}", "eval_every=0 runs no evaluation, the final one "
                                "included"))
        if self.mode == "full" and self.kernels is not None:
            ignored.append((f"kernels={self.kernels!r}", "mode='full' has no LoRA layers or merges (the kernels' "
                            "only users)"))
        if self.export_dtype is not None and not self.export:
            ignored.append((f"export_dtype={self.export_dtype!r}", "export=False writes no export (launch/export.py "
                            "--dtype chooses one for a later export)"))
        if self.prune_method == "reset" and self.prune_ratio != TrainConfig.prune_ratio:
            ignored.append((f"prune_ratio={self.prune_ratio}", "prune_method='reset' zeroes the whole moments"))
        for setting, why in ignored:
            warned.append(f"{setting} is ignored: {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELD_DEFAULTS = {f.name: f.default_factory() for f in dataclasses.fields(TrainConfig)
                   if f.default_factory is not dataclasses.MISSING}
