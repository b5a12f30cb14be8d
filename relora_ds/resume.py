"""The trainer's checkpoints and resume: what a checkpoint holds besides DeepSpeed's state, saving it, and
what ``--resume`` / ``--resume-from`` do (go back to a chosen checkpoint, load it on any world size, apply
the recipe's optimizer settings, catch up a merge that older code skipped). A mixin of
``relora_ds.trainer.Trainer``, which owns the engine, the data and the loop; the file-level logic (layout,
atomic ``latest``) is in ``relora_ds/checkpoint.py``, what a resume loads and may change in
``relora_ds/resume_plan.py``, the universal conversion in ``relora_ds/universal.py``."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from . import checkpoint, reset_hook, universal
from .distributed import on_rank_zero
from .engines import group_weight_decay
from .hf import PROGRESS_FILE
from .relora import relora_layers
from .resume_plan import nothing_to_resume, sub_group_size
from .schedule import cycle_anchor, last_reset
from .train_config import ConfigWarning
from .zero_reset import unshare_optimizer_steps


def _saved_cycle_length(plan: dict) -> float | None:
    """The cycle_length the checkpoint's run trained with: a LoRA checkpoint resumed as ReLoRA had no reset since
    the switch (one cycle as long as it trained); a full-rank one none."""
    saved_mode = plan["saved"]["train"].get("mode")
    return plan["saved"]["train"].get("cycle_length") if saved_mode == "relora" else math.inf \
        if saved_mode == "lora" else None


def resumed_cycles(plan: dict, cfg, relora_start: int) -> tuple[int, int, bool]:
    """``(cycle_start, cycles_before, reset_now)`` of a resume from ``plan`` (resume_plan.plan_resume's) with the
    settings ``cfg``: where its cycles count from (schedule.cycle_anchor), for the trainer and preflight."""
    progress = plan["saved"].get("progress") or {}
    return cycle_anchor(checkpoint.tag_step(plan["tag"]), relora_start=relora_start,
                        cycle_length=cfg.cycle_length if cfg.mode == "relora" else None,
                        saved_cycle_length=_saved_cycle_length(plan), saved_start=progress.get("cycle_start"),
                        saved_before=progress.get("cycles_before", 0))


class CheckpointsMixin:
    def state_dict(self) -> dict:
        # step_events_done: the merge and reset due at `step`, if any, are in this checkpoint (saves come after
        # them); checkpoints without the key predate that order (see _catch_up_missed_merge).
        return {"step": self.step, "phase": self.engine_phase, "relora_start": self.relora_start,
                "sampler": self.batches.state_dict(), "world_size": self.world, "step_events_done": True,
                "tokens_seen": self.tokens_seen}

    def progress(self) -> dict:
        """How far training got, in each checkpoint's config.json and each export's relora_ds_progress.json
        (a run continuing from the export reads on after the data it trained on: --warm-start-data), and whether
        it attended within documents (launch/evaluate.py evaluates as it trained)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.batches.state_dict(),
                "seed": self.cfg.seed, "data": self.data_info, "document_masking": bool(self.cfg.document_masking),
                "cycle_start": self.cycle_start, "cycles_before": self.cycles_before}

    def _resume_cycles(self, plan: dict) -> None:
        """Where this run's cycles count from (schedule.cycle_anchor), from the checkpoint's config.json: a
        changed cycle_length counts from the checkpoint's last reset, so the next one comes a whole new cycle
        after it, with the lr's restart warmup after the last one intact. The trainer builds the schedule on it."""
        progress = plan["saved"].get("progress") or {}
        step = checkpoint.tag_step(plan["tag"])
        before = _saved_cycle_length(plan)
        self.cycle_start, self.cycles_before, self.reset_on_resume = resumed_cycles(plan, self.cfg, self.relora_start)
        if self.reset_on_resume and before == math.inf:
            self._print(f"mode lora -> relora: the checkpoint trained plain LoRA for {step - self.relora_start} steps "
                        f"since the switch at step {self.relora_start}, a whole cycle_length ({self.cfg.cycle_length}) "
                        f"or more, so the first reset is overdue: it is done now, at step {step}, and cycles count "
                        f"from here; the next reset is at step {step + self.cfg.cycle_length}")
        elif self.reset_on_resume:
            saved_start = progress.get("cycle_start")
            last = last_reset(step, self.relora_start if saved_start is None else saved_start, before)
            self._print(f"cycle_length {before} -> {self.cfg.cycle_length}: the checkpoint's last reset (step {last}) "
                        f"is a whole new cycle or more back, so the reset is overdue: it is done now, at step {step}, "
                        f"and cycles count from here; the next reset is at step {step + self.cfg.cycle_length}")
        elif self.cycle_start != progress.get("cycle_start", self.relora_start):
            self._print(f"cycle_length {before} -> {self.cfg.cycle_length}: cycles now count from the reset at step "
                        f"{self.cycle_start}, the checkpoint's last; the next reset is at step "
                        f"{self.cycle_start + self.cfg.cycle_length}")

    def _warm_start_save_due(self) -> bool:
        """--keep-warm-start: the last step of an in-run warm start is checkpointed (the switch comes next)."""
        return bool(self.cfg.keep_warm_start and self.relora_start and self.step == self.relora_start)

    def _protected_checkpoints(self) -> tuple[str, ...]:
        return (f"step_{self.relora_start}",) if self.cfg.keep_warm_start and self.relora_start else ()

    def _continue_warm_start_data(self) -> None:
        """--warm-start-from DIR, --warm-start-data continue: the sampler reads on after the windows the warm start
        trained on (DIR's PROGRESS_FILE: its sampler state, seed and data), so that the ReLoRA phase sees new
        data as the same steps of an in-run warm start do. Where that cannot be done, a warning says why."""
        source = Path(self.cfg.warm_start_from)
        path = source / PROGRESS_FILE
        restart = "; --warm-start-data restart silences this"
        if not path.is_file():
            warnings.warn(f"{source} has no {PROGRESS_FILE} (an export of another tool, or of a checkpoint saved "
                          "before checkpoints recorded their sampler): where its training stopped in the data is "
                          "unknown, so this run reads the data from its beginning, first the windows the warm start "
                          f"may have trained on{restart}", ConfigWarning, stacklevel=2)
            return
        progress = json.loads(path.read_text())
        data = progress.get("data") or {}
        if data.get("fingerprint") != self.data_info["fingerprint"]:
            self._print(f"warm start {source} trained on other data: this run reads its data from the beginning")
            return
        if data != self.data_info:  # the same tokens cut into windows of another length
            warnings.warn(f"{source} trained on this data in windows of another seq_len ({data.get('train_windows')} "
                          f"windows, this run {self.data_info['train_windows']}): its windows cannot be skipped in "
                          f"this run's order, which starts at the beginning and re-reads its tokens{restart}",
                          ConfigWarning, stacklevel=2)
            return
        if progress.get("seed") != self.cfg.seed:
            warnings.warn(f"{source} trained on this data in the order of seed {progress.get('seed')}, and this "
                          f"run's seed {self.cfg.seed} orders it anew: it re-reads windows the warm start trained "
                          f"on; give --seed {progress.get('seed')} to read on after them{restart}", ConfigWarning,
                          stacklevel=2)
            return
        self.batches.load_state_dict(progress["sampler"])
        sampler = progress["sampler"]
        self._print(f"warm start {source} has read {sampler['samples_consumed']:,} windows of this data (its "
                    f"sampler: any warm start it read on from included; its own run {progress.get('tokens_seen', 0):,} "
                    f"tokens in {progress.get('step')} steps): this run reads on after them (epoch {sampler['epoch']}, "
                    f"window {sampler['position']:,} of its order)")
        if not self.metrics.logged(0, "warm_start_step"):  # (a --resume before the first checkpoint logged it)
            self.metrics.log({"event": "warm_start_data", "step": 0, "warm_start_step": progress.get("step"),
                              "samples_consumed": sampler["samples_consumed"], "epoch": sampler["epoch"],
                              "position": sampler["position"]})

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))  # checkpoints before the counter: see _resume
        self.batches.load_state_dict(state["sampler"])

    def save(self) -> Path:
        start = time.perf_counter()
        self.metrics.sync()  # the records up to this step on disk before the checkpoint that resumes after them
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.state_dict(),
                               {**self._run_config(), "progress": self.progress()},
                               self.cfg.keep_last, protect=self._protected_checkpoints())
        self.metrics.log({"event": "checkpoint", "step": self.step, "path": str(path),
                          "save_seconds": time.perf_counter() - start})
        return path

    def _resume(self) -> bool:
        if self.resume_plan is None:
            if self.rank == 0:  # a warning, not a line among the config: a mistyped --output-dir shows here
                warnings.warn(nothing_to_resume(self.ckpt_dir), ConfigWarning, stacklevel=2)
            return False
        tag, saved, as_universal = (self.resume_plan[k] for k in ("tag", "saved", "universal"))
        step = checkpoint.tag_step(tag)
        # The engine that wrote step_N trained step N-1: at N == warm_start_steps still the full-rank one
        # (the loop switches before step N's training).
        phase = self._phase(step - 1)
        load_tag = tag
        if as_universal:
            def layout(world, lay):
                place = "on the device" if lay["offload_optimizer"] == "none" else \
                    f"offloaded to {lay['offload_optimizer']}"
                return (f"{world} rank(s), ZeRO stage {lay['zero_stage']}, {lay['precision']}, optimizer "
                        f"{lay.get('optimizer', 'Adam')} {place}")
            then, now = self.resume_plan["layouts"]
            groups = [sub_group_size(ds) for ds in (saved["deepspeed"], self.ds)] if now["zero_stage"] == 3 else []
            regrouped = f" (ZeRO-3 sub_group_size {groups[0]} -> {groups[1]})" if len(set(groups)) == 2 else ""
            self._print(f"checkpoint {self.ckpt_dir / tag} was written with {layout(saved['world_size'], then)}, "
                        f"this run has {layout(self.world, now)}{regrouped}: loading it as a DeepSpeed universal "
                        "checkpoint")
            groups = None if checkpoint.is_sharded(self.ckpt_dir, tag) else self._param_group_names(phase)
            load_tag = universal.make_universal(self.ckpt_dir, tag, groups)
            if groups is not None and self.resume_plan["stages"][1] == 3:
                universal.check_zero3_load(self.ckpt_dir / load_tag)
        # The checkpoint holds every weight (frozen bases, int8 or not, and their residuals included): a fresh
        # model takes them; an hf_model's weights are not read again (minutes at 7b, at every requeue).
        self._build_engine(self._fresh_model(), phase, load_universal=as_universal)
        built = self._optimizer_as_built()  # from this run's config, before the checkpoint overwrites it
        try:
            with checkpoint.globbable(self.ckpt_dir) as plain:  # (DeepSpeed globs for the ranks' files in it)
                _, client = self.engine.load_checkpoint(str(plain), tag=load_tag)
        except (AssertionError, FileNotFoundError) as e:  # DeepSpeed asserts that its files exist
            raise ValueError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / load_tag}: {type(e).__name__}: "
                             f"{e} (a file missing from it?); resume from another one with --resume-from step_N "
                             f"(others there: {[t for t in checkpoint.complete_tags(self.ckpt_dir) if t != tag]})") from e
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {self.ckpt_dir / load_tag}")
        if client.get("phase", phase) != phase:
            raise RuntimeError(f"{self.ckpt_dir / tag} was written in the {client['phase']!r} phase, "
                               f"expected {phase!r}")
        if as_universal:
            universal.restore_frozen_from_universal(self.engine.module, self.ckpt_dir / load_tag)
            unshare_optimizer_steps(self.engine)
        # A checkpoint that records its data was checked before any engine (resume_plan.check_same_data); an older
        # one only here, by its sampler's window count.
        saved_windows = client["sampler"].get("num_samples")
        if saved_windows is not None and saved_windows != self.batches.num_samples:
            raise ValueError(f"checkpoint {self.ckpt_dir / tag} was trained on {saved_windows:,} windows of training "
                             f"data, but {self.data_dir} holds {self.batches.num_samples:,} windows of seq_len "
                             f"{self.cfg.seq_len}: other data (another --data-dir, or this one prepared again from another "
                             "corpus or options), on which its sampler position would name other samples. Resume on the data it was trained on, "
                             "or start a new run from its export (launch/export.py, then --warm-start-from or "
                             "--hf-model)")
        self.load_state_dict(client)
        if "tokens_seen" not in client:  # written before the counter: its steps at its own batch
            self.tokens_seen = self.step * saved["train"]["global_batch_size"] * saved["train"]["seq_len"]
        self._apply_optimizer_settings(saved, built)
        self._catch_up_missed_merge(client)
        if self.reset_on_resume:  # a shorter cycle_length made the checkpoint's step a missed reset (cycle_anchor)
            event = reset_hook.after_step(self.engine, self.step, self.cfg, self.cycle_start - self.cfg.cycle_length)
            if not self.metrics.logged(self.step, "overdue"):  # (resumed here before: done again, logged once)
                self._event({**event, "overdue": True})
        if self.engine.zero_optimization_stage() == 3:
            # DeepSpeed's ZeRO-3 load leaves the persisting parameters (below stage3_param_persistence_threshold:
            # the tiny preset's 53 norms and LoRA factors) gathered: the first forward then gathers fewer than
            # its recompute does in backward, whose op counts selective activation checkpointing requires to
            # match ("aten.slice.Tensor invocation index 17 encountered during backward but not found in
            # storage"). Partitioned again, every step gathers alike.
            self.engine.empty_partition_cache()
        if saved.get("dropout_streams") is None and self.cfg.dropout and self.engine_phase == "lowrank":
            # written before each rank had its own stream: every rank's saved state is the same
            self._seed_dropout()
            self._print(f"checkpoint {self.ckpt_dir / tag} was written when every rank drew the same LoRA dropout "
                        "masks: from here each rank draws its own (README, 'Checkpoints and resume')")
        elif saved["world_size"] != self.world or not checkpoint.load_rng(self.ckpt_dir, tag):
            # per-rank RNG streams do not map onto other ranks (only LoRA dropout draws from them); a missing
            # state file: the stream a start at this step gets, not step 0's again
            self._seed_dropout()
        self._print(f"resumed from {self.ckpt_dir / tag} at step {self.step}")
        return True

    def _catch_up_missed_merge(self, client: dict) -> None:
        """A final checkpoint written before relora_ds did the last step's reset (before 2026-11-30) sits on
        a merge step without its merge: do it now, once, so extending such a run loses no reset. Only for
        checkpoints without ``step_events_done``: the merge count cannot tell once cycle_length changes."""
        if client.get("step_events_done"):
            return
        if self.cycle_start != self.relora_start:  # moved by this resume's new cycle_length (_resume_cycles)
            raise ValueError(f"the checkpoint of step {self.step} was written before relora_ds recorded whether "
                             "its step's merge and reset were done (before 2026-11-30), and this resume changes "
                             "cycle_length, which it cannot tell them from then: resume it with its own cycle_length "
                             "first (--total-steps one step further), then change it")
        cfg = self.cfg
        since = self.step - self.relora_start
        merge, _ = reset_hook.events_due(since, cfg.cycle_length, cfg.merge_every)
        if cfg.mode != "relora" or self.engine_phase != "lowrank" or not merge:
            return
        every = cfg.merge_every or cfg.cycle_length
        layer = next(layer for _, layer in relora_layers(self.engine.module))
        if int(layer.merge_count) == since // every - 1:
            self._after_step_events()

    # Param-group settings the recipe re-applies after a load (_apply_optimizer_settings) or that are not settings.
    _REAPPLIED = frozenset({"params", "lr", "initial_lr", "betas", "eps", "weight_decay", "step"})

    def _optimizer_as_built(self) -> dict:
        """What this run's config built, before a checkpoint load overwrites it: each param group's settings
        and the fp16 loss scaler (DeepSpeed restores both from the checkpoint)."""
        opt = self.engine.optimizer
        return {"groups": [{k: v for k, v in g.items() if k not in self._REAPPLIED}
                           for g in self.engine.lr_scheduler.optimizer.param_groups],
                "loss_scaler": getattr(opt, "loss_scaler", None)}

    def _apply_optimizer_settings(self, checkpoint_config: dict, built: dict | None = None) -> None:
        """The recipe's lr, betas, eps and weight decay, not the checkpoint's: DeepSpeed restores the param
        groups and LambdaLR's base lrs, so resuming with e.g. a lower lr after a divergence would
        otherwise silently keep the old one. Logs every setting that differs from the checkpoint's (its
        config.json, `checkpoint_config`), DeepSpeed config entries and the number of ranks included.

        `built` (:meth:`_optimizer_as_built`): a changed fp16 section takes effect (DeepSpeed restores the
        checkpoint's loss scaler: its scale carries over where both are dynamic), and any other optimizer.params
        change that the restored param groups would undo (amsgrad, foreach, ...) is an error."""
        cfg, saved = self.cfg, checkpoint_config["train"]
        groups = self.engine.lr_scheduler.optimizer.param_groups
        if built is not None:
            # (a key the restored groups lack -- a checkpoint of another torch or Adam class -- is not compared)
            undone = {k: (g[k], v) for b, g in zip(built["groups"], groups) for k, v in b.items()
                      if k in g and g[k] != v}
            if undone:
                raise ValueError("the DeepSpeed config's optimizer.params change what the checkpoint's optimizer "
                                 "restores and keeps: " + ", ".join(f"{k}: checkpoint {old!r}, now {new!r}"
                                                                   for k, (old, new) in undone.items())
                                 + "; resume with the checkpoint's values, or start a new run from its export "
                                 "(launch/export.py, then --warm-start-from)")
            then_fp16 = checkpoint_config.get("deepspeed", self.ds).get("fp16")
            if built["loss_scaler"] is not None and then_fp16 != self.ds.get("fp16"):
                self._use_built_loss_scaler(built["loss_scaler"])
        lr = self._phase_lr(self.engine_phase)
        sched = self.engine.lr_scheduler
        sched.base_lrs = [lr] * len(sched.base_lrs)
        kinds = self._group_kinds()
        if len(kinds) != len(sched.optimizer.param_groups):
            raise RuntimeError(f"the engine's optimizer has {len(sched.optimizer.param_groups)} param groups, its "
                               f"model {len(kinds)} ({kinds})")
        for group, fn, kind in zip(sched.optimizer.param_groups, sched.lr_lambdas, kinds):
            group.update(lr=lr * fn(sched.last_epoch), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                         weight_decay=group_weight_decay(kind, cfg))
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        # DeepSpeed's ZeRO-1/2, BF16 and FP16 optimizers clip with the value saved in the checkpoint
        # (load_state_dict sets clip_grad from it), not the engine's config: a resume with --grad-clip would
        # log the change and keep the old clip.
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = cfg.grad_clip
        # Every other setting a resume may change (total_steps, cycle_length, batch sizes, clipping, ...) takes
        # effect through the new config; all of them are named once here.
        changed = {k: f"{saved.get(k)} -> {v}" for k, v in cfg.to_dict().items()
                   if k not in ("resume", "resume_from", "overwrite") and k in saved and saved[k] != v
                   and not (k == "model" and v is None)}  # older checkpoints of an HF model recorded the default
        if checkpoint_config.get("world_size", self.world) != self.world:
            changed["world_size"] = f"{checkpoint_config['world_size']} -> {self.world}"
        then, now = _flat(checkpoint_config.get("deepspeed", self.ds)), _flat(self.ds)
        changed.update({f"deepspeed.{k}": f"{then.get(k)} -> {now.get(k)}" for k in sorted(then.keys() | now.keys())
                        if then.get(k) != now.get(k)})
        if changed:
            self._event({"event": "resume_settings_changed", "step": self.step, **changed})

    def _use_built_loss_scaler(self, fresh) -> None:
        """The loss scaler of this run's fp16 section instead of the checkpoint's; a dynamic scale keeps the
        value (and overflow history) it reached, within the new minimum."""
        opt = self.engine.optimizer
        restored = opt.loss_scaler
        if getattr(fresh, "dynamic", False) and getattr(restored, "dynamic", False):
            fresh.cur_scale = max(restored.cur_scale, fresh.min_scale)
            fresh.cur_iter, fresh.last_overflow_iter = restored.cur_iter, restored.last_overflow_iter
        opt.loss_scaler = fresh
        if hasattr(opt, "dynamic_loss_scale"):
            opt.dynamic_loss_scale = fresh.dynamic

    def _rewind(self) -> None:
        """--resume-from: the checkpoints after it move aside (the metrics after it move aside in MetricsLogger).
        Every rank has planned from the same files (the barrier) before rank 0 moves any."""
        dist.barrier()
        plan = self.resume_plan

        def move():
            if plan and plan["rewind"]:
                moved = checkpoint.rewind(self.ckpt_dir, plan["tag"], plan["rewind"])
                self._print(f"--resume-from {plan['tag']}: moved the later checkpoints to "
                            f"{self.ckpt_dir / checkpoint.REWOUND}: " + ", ".join(p.name for p in moved))
        on_rank_zero(move)


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
