"""The trainer's models and DeepSpeed engines: the model a run starts from (a preset or a Hugging Face
directory; under ZeRO-3 built partitioned, relora_ds/zero_init.py), the ReLoRA wrap, the engine with its
parameter groups and LR schedule, and the warm-start switch from the full-rank engine to the ReLoRA one.
A mixin of ``relora_ds.trainer.Trainer``, which owns the configuration, the data and the loop."""
from __future__ import annotations

import functools
import gc
import warnings

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import set_z3_leaf_module
from torch.optim.lr_scheduler import LambdaLR

from . import universal, zero_init
from .ds_config import zero_stage
from .ds_patches import release_engine
from .ds_schema import uses_bf16, uses_fp16
from .engine_state import full_fp32_state_dict
from .flops import flops_per_token
from .hf import hf_tensors, load_hf
from .hf_load import check_tied_head
from .model import LlamaForCausalLM
from .relora import dropout_seed, lora_parameters, relora_layers, wrap
from .zero_reset import set_full


def _shifted(step: int, *, fn, offset: int) -> float:
    """LambdaLR counts from the engine's creation; the schedule is a function of the global step."""
    return fn(step + offset)


def compile_for_engine(model: LlamaForCausalLM, ds: dict, **kwargs) -> None:
    """--compile of a model about to go into ``deepspeed.initialize`` with the completed config ``ds``: its
    decoder layers compiled (``compile_layers``); under ZeRO-3 each layer a leaf module, whose own hooks gather
    its weights around its compiled forward, and none inside it (its submodules' hooks would break the graph
    at every linear layer): one gather per layer, as FSDP wraps each block. ``kwargs`` go to torch.compile."""
    model.compile_layers(**kwargs)
    if zero_stage(ds) == 3:
        for layer in model.model.layers:
            set_z3_leaf_module(layer, True)


class EnginesMixin:
    def _phase(self, step: int) -> str:
        return "full" if self.cfg.mode == "full" or step < self.relora_start else "lowrank"

    def _base_model(self, phase: str) -> LlamaForCausalLM:
        """The model a run starts from: a Hugging Face directory's (hf_model, warm_start_from), else random
        from the seed. Under ZeRO-3 built partitioned, and for the ReLoRA phase wrapped before a directory's
        weights go in (an int8 base quantized from them, as from the whole model)."""
        # The random init's seed, the same on every rank (the LoRA dropout's streams: _seed_dropout).
        torch.manual_seed(self.cfg.seed)
        src = self.cfg.hf_model or self.cfg.warm_start_from
        if not src:
            if phase == "lowrank" and self.cfg.quantize and zero_init.partitions_at_build(self.ds, self.cfg.zero_init):
                # The int8 base quantized from the fp32 init, as the whole build's (wrapped before the engine's
                # cast): built partitioned in fp32, wrapped, then cast.
                model = self._fresh_model(fp32=True)
                self._wrap(model)
                return zero_init.cast_partitions_(model, self.ds)
            return self._fresh_model()
        if not zero_init.partitions_at_build(self.ds, self.cfg.zero_init):
            return load_hf(src)
        model = self._fresh_model()
        if phase == "lowrank":
            self._wrap(model)
        tied = self.model_config.tie_word_embeddings  # lm_head is the embedding, stored or not
        check_tied_head(src, self.model_config)  # (not at a resume, which reads no weight from src)
        zero_init.load_(model, ((k, t) for k, t in hf_tensors(src) if not (tied and k == "lm_head.weight")), src)
        return model

    def _fresh_model(self, fp32: bool = False) -> LlamaForCausalLM:
        """A randomly initialized model; under ZeRO-3 partitioned as it is built (relora_ds/zero_init.py), in
        the config's dtype or with ``fp32`` in fp32. (The LoRA dropout's stream is seeded after the engine is
        built: ``_seed_dropout``.)"""
        with zero_init.building(self.ds, self.cfg.zero_init, fp32=fp32):
            return LlamaForCausalLM(self.model_config)

    def _build_engine(self, model: LlamaForCausalLM, phase: str, load_universal: bool = False) -> None:
        cfg = self.cfg
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(num_layers=cfg.activation_checkpointing_layers,
                                                policy=cfg.activation_checkpointing_policy)
        if cfg.loss_chunk_size:
            model.chunked_loss_enable(cfg.loss_chunk_size)
        if cfg.document_masking:
            model.document_masking_enable(self.eos_id)
        if phase == "lowrank" and not any(True for _ in relora_layers(model)):
            self._wrap(model)
        zero_init.partition_(model, self.ds, cfg.zero_init)  # whatever arrived whole (under ZeRO-3)
        if cfg.compile:
            compile_for_engine(model, self.ds, backend=cfg.compile_backend)
        groups = optimizer_groups(model, cfg)
        offset = 0 if phase == "full" else self.relora_start
        fn = functools.partial(_shifted, fn=self.schedule, offset=offset)
        model.universal_checkpoint_info = universal.UNIVERSAL_INFO  # lets ds_to_universal convert our checkpoints
        ds = {**self.ds, "checkpoint": {**self.ds.get("checkpoint", {}), "load_universal": True}} \
            if load_universal else self.ds
        if self._phase_lr(phase) != cfg.lr:  # the warm start's own peak lr
            ds = {**ds, "optimizer": {**ds["optimizer"], "params": {**ds["optimizer"]["params"],
                                                                    "lr": self._phase_lr(phase)}}}
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds,
                                               lr_scheduler=lambda opt: LambdaLR(opt, fn))
        self.engine_phase = phase
        self._seed_dropout()
        self.flops_per_token = flops_per_token(model, cfg.seq_len)  # the warm start's, then ReLoRA's

    def _seed_dropout(self) -> None:
        """From here the global generators feed only the LoRA dropout (the init above drew the same numbers on
        every rank): each data-parallel rank its own stream, so W ranks draw the masks of one process with
        W× the micro-batches, not one mask W times. Seeded from the step, so that a resume on another
        number of ranks (relora_ds/resume.py) seeds as a start at its step does."""
        torch.manual_seed(dropout_seed(self.cfg.seed, self.step, self.rank))

    def _source_masters(self) -> None:
        """A run starting from hf_model or warm_start_from stored in fp32 (an export's default) gives the trained
        parameters the source's fp32 values as masters: under bf16/fp16 deepspeed.initialize builds them from
        the model's 16-bit copies, rounding every value (relative error up to 2^-9 in bf16), as the in-run
        warm start's switch keeps its own (_switch_to_lowrank). Every rank reads the source, in the same order
        (ZeRO-3: each writes its own slice)."""
        src = self.cfg.hf_model or self.cfg.warm_start_from
        if not src or not (uses_bf16(self.ds) or uses_fp16(self.ds)):
            return
        if self.engine.zero_optimization_stage() == 0:
            if self.rank == 0:  # DeepSpeed's stage-0 16-bit optimizers (mode=full only) take no set-full
                warnings.warn(f"ZeRO stage 0 with bf16/fp16: the fp32 masters start from {src}'s weights rounded to "
                              "16 bits (DeepSpeed's stage-0 16-bit optimizer cannot be given them); ZeRO stage 1 "
                              "takes the source's fp32 values, with the same memory on one rank", RuntimeWarning,
                              stacklevel=2)
            return
        lora = {id(p) for p in lora_parameters(self.engine.module)}
        trained = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad and id(p) not in lora}
        for name, tensor in hf_tensors(src, dtype=None, names=trained):  # 7b ReLoRA: ~1 of its 27 GB read
            if name in trained and tensor.dtype in (torch.float32, torch.float64):
                set_full(trained[name], tensor.float())

    def _param_group_names(self, phase: str) -> list[list[str]]:
        """The parameter names in each optimizer param group of a ``phase`` engine, from the model built on the
        meta device (no memory, no init, the random streams untouched): a checkpoint without ZeRO keys its
        optimizer state by position in these groups (universal.make_universal)."""
        with torch.device("meta"):
            model = LlamaForCausalLM(self.model_config)
            if phase == "lowrank":
                self._wrap(model)
        return [[name for name, _ in group] for _, group in param_groups(model)]

    def _group_kinds(self) -> list[str]:
        """The kind of each param group of the engine (checkpoint.OPTIMIZER_GROUPS), in its order."""
        return [kind for kind, _ in param_groups(self.engine.module)]

    def _wrap(self, model: LlamaForCausalLM) -> None:
        cfg = self.cfg
        wrap(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
             seed=cfg.seed, quantize=cfg.quantize, merge_residual=cfg.merge_residual)

    def _phase_lr(self, phase: str) -> float:
        cfg = self.cfg
        return cfg.warm_start_lr if phase == "full" and cfg.mode != "full" and cfg.warm_start_lr else cfg.lr

    def _switch_to_lowrank(self) -> None:
        """End of the warm start: full-rank weights (fp32 masters) into a fresh ReLoRA engine. The parameters
        that stay trainable (embeddings, norms, head, biases) keep their fp32 masters: deepspeed.initialize
        would build them from the model's bf16/fp16 copies, rounding away every update below that precision."""
        if zero_init.partitions_at_build(self.ds, self.cfg.zero_init):
            # ZeRO-3: a ReLoRA model built partitioned takes the masters one parameter at a time (each
            # gathered in turn: no rank holds the whole model)
            model = self._fresh_model()
            self._wrap(model)
            trainable, masters = _full_rank_trainable(model), {}
            separate_masters = uses_bf16(self.ds) or uses_fp16(self.ds)

            def tensors():
                for name, full in zero_init.engine_tensors(self.engine):
                    if separate_masters and name in trainable:
                        # In host memory: gathered on the GPU (even with offload_param), the embeddings' and
                        # head's fp32 copies would hold GBs there while the new engine is built (8b: ~4 GB).
                        masters[name] = full.cpu()
                    yield name, full
            zero_init.load_(model, tensors(), "the full-rank engine")
        else:
            # Built on the meta device, the model takes the gathered fp32 tensors themselves: one full fp32
            # copy per rank in host memory, not two (7b: 27 GB, times the ranks of a node).
            with torch.device("meta"):
                model = LlamaForCausalLM(self.model_config)
            model.load_state_dict(full_fp32_state_dict(self.engine), assign=True)
            model.tie_weights()  # assign=True gave a tied lm_head a Parameter of its own
            self._wrap(model)
            trainable = _full_rank_trainable(model)
            masters = {n: p.detach() for n, p in model.named_parameters() if n in trainable}
        # The full-rank engine's weights, fp32 masters, Adam moments and gradient buffers go before the new
        # engine is built: destroy() frees no tensor, and DeepSpeed's engine holds reference cycles.
        release_engine(self.engine)
        self.engine = None
        if self.cfg.compile:  # the full-rank layers' graphs go too: they would hold cache entries the ReLoRA
            torch._dynamo.reset()  # layers' share (one code object), toward torch's recompile limit; the
            torch._dynamo.utils.counters.clear()  # `compiled` events count the ReLoRA phase's own
            self._compile_reported = None
        gc.collect()
        get_accelerator().empty_cache()
        if torch.cuda.is_initialized():  # peak_memory_mb from here on is the ReLoRA phase's own
            torch.cuda.reset_peak_memory_stats()
        self._build_engine(model, "lowrank")
        if uses_bf16(self.ds) or uses_fp16(self.ds):  # separate fp32 masters, built from the 16-bit copies
            for name, p in self.engine.module.named_parameters():
                if name in masters:
                    set_full(p, masters[name])
        masters.clear()
        self._event({"event": "switch_to_relora", "step": self.step})


# The engine's param groups (checkpoint.OPTIMIZER_GROUPS, which each checkpoint records), in this order (an
# empty one left out): the LoRA factors (the reset prunes their moments and no others), the matrices trained
# full-rank (embeddings, head, and in a full-rank run every linear) and the vectors trained full-rank (norms'
# gains, biases), which take no weight decay by default.
def param_groups(model) -> list[tuple[str, list[tuple[str, torch.nn.Parameter]]]]:
    """The engine's param groups as ``(kind, [(name, parameter), ...])`` (kinds: checkpoint.OPTIMIZER_GROUPS), parameters in
    model order. Under ZeRO-3 a partitioned parameter is flat; its ``ds_shape`` decides matrix or vector."""
    lora = {id(p) for p in lora_parameters(model)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vector = lambda p: len(getattr(p, "ds_shape", p.shape)) < 2  # noqa: E731
    groups = [("lora", [(n, p) for n, p in named if id(p) in lora]),
              ("matrices", [(n, p) for n, p in named if id(p) not in lora and not vector(p)]),
              ("vectors", [(n, p) for n, p in named if id(p) not in lora and vector(p)])]
    return [(kind, group) for kind, group in groups if group]


def group_weight_decay(kind: str, cfg) -> float:
    """A param group's weight decay: the recipe's, but none on the norms and biases unless
    ``decay_norms_and_biases`` (the reference code decays every trainable parameter)."""
    return cfg.weight_decay if kind != "vectors" or cfg.decay_norms_and_biases else 0.0


def optimizer_groups(model, cfg) -> list[dict]:
    """What deepspeed.initialize takes as ``model_parameters``: param_groups(model) with each group's weight
    decay (the DeepSpeed config's optimizer weight_decay, the recipe's, is the default the groups override)."""
    return [{"params": [p for _, p in group], "weight_decay": group_weight_decay(kind, cfg)}
            for kind, group in param_groups(model)]


def _full_rank_trainable(model) -> set[str]:
    """Names of the parameters a wrapped model trains full-rank (all but the LoRA factors and frozen bases)."""
    lora = {id(p) for p in lora_parameters(model)}
    return {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora}
