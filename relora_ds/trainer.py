"""The training loop: a DeepSpeed engine around our LLaMA, ReLoRA's merges and resets, eval (checkpoints and
resume: relora_ds/resume.py; the engines: relora_ds/engines.py; one optimizer step: relora_ds/steps.py).

Phases: an optional full-rank warm start, then the low-rank phase (``relora`` with merges and optimizer
resets, or ``lora`` without); ``full`` trains full-rank throughout. The switch builds a new engine with a
fresh optimizer (the paper's warm start) and counts as a reset for the LR schedule.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import relora_kernels
from deepspeed.accelerator import get_accelerator
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, reset_hook, run_info, zero_init
from .data import DataWarning, ShardedBatches, builtin_data_dir, load_manifest, open_eval_split, open_split
from .data.manifest import read_manifest_file
from .compiling import cache_entries, compile_stats, compile_warnings, recompile_limit
from .distributed import agree_on_master_port, agreement, init_distributed, max_over_ranks, on_rank_zero, \
    single_process_environment
from .flops import mfu_peak
from .ds_config import complete_ds_config, load_ds_config, uses_bf16, uses_fp16, zero_stage
from .engines import EnginesMixin
from .ds_patches import patch_deepspeed_nvme
from .evaluate import validation_losses
from .hf import export_run, model_from_engine, with_merge_record
from .metrics import MetricsLogger, cycle_position, peak_memory_mb, progress_line
from .relora import lora_parameters
from .resume import CheckpointsMixin
from .ds_machine import check_nvme_swap_buffers, check_offload_on_device, check_precision_on_device, nvme_offloads
from .output_dir import check_output_dir, check_shared_output_dir, clear_previous_run, holds_output_dir_lock, \
    lock_output_dir, unlock_output_dir
from .resume_plan import plan_resume, resume_progress
from .startup import apply_kernels_setting, build_schedule, check_compile, check_data_use, check_document_masking, \
    check_kernels, check_model_and_data, train_data_record, unused_vocab_size
from .schedule import total_steps_for
from .steps import StepsMixin
from .stop_signals import StopSignalsMixin
from .train_config import BUILTIN_VOCAB_SIZE, ConfigWarning, TrainConfig
from .zero_reset import offloaded


# How each rank's LoRA dropout stream is seeded (engines._seed_dropout); checkpoints record it. Those without it
# (before 2026-12-05) hold the same RNG state on every rank: a resume seeds them anew (resume.py).
DROPOUT_STREAMS = "per_rank"


class Trainer(EnginesMixin, CheckpointsMixin, StepsMixin, StopSignalsMixin):
    def __init__(self, cfg: TrainConfig, ds_config_path: str | None = None,
                 early_stop: Callable[[], int] | None = None):
        """``early_stop``: returns the number of a stop signal (SIGTERM/SIGUSR1) the process got before this
        Trainer installed its handler, else 0 (launch/train.py records them from its first line): the run
        then stops before its first step."""
        self._signal_handlers, self._took_lock = {}, False
        try:
            self._build(cfg, ds_config_path, early_stop)
        except BaseException:
            # A refused recipe releases the output_dir lock it took (not one an earlier Trainer in this process
            # holds): a notebook's process held it until it ended, refusing a run started elsewhere.
            if self._took_lock:
                unlock_output_dir(self.out)
            self._restore_signal_handlers()
            raise

    def _build(self, cfg: TrainConfig, ds_config_path: str | None, early_stop: Callable[[], int] | None) -> None:
        self.cfg = cfg
        apply_kernels_setting(cfg.kernels)
        check_kernels(cfg, torch.cuda.is_available())
        check_compile(cfg, torch.cuda.is_available())
        check_output_dir(cfg)
        single_process_environment()
        # Under mpirun DeepSpeed discovers ranks through mpi4py and would take port 29500 whatever the
        # environment says; honour MASTER_PORT (rank 0's, on every rank) so that two MPI jobs can share a node.
        agree_on_master_port()
        if os.environ.get("DEEPSPEED_TIMEOUT"):
            warnings.warn(f"DEEPSPEED_TIMEOUT={os.environ['DEEPSPEED_TIMEOUT']} is ignored: collective_timeout_min="
                          f"{cfg.collective_timeout_min} sets the collectives' timeout", ConfigWarning, stacklevel=2)
        init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                         timeout=datetime.timedelta(minutes=cfg.collective_timeout_min))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.output_dir)
        self._took_lock = self.rank == 0 and not holds_output_dir_lock(self.out)
        with self._warnings_on_rank_zero():  # rank 0's lock on output_dir, until close() or the process ends
            on_rank_zero(lambda: lock_output_dir(self.out))
        check_shared_output_dir(self.out, self.rank, self.world)  # node-local disks: every rank stops here
        with self._warnings_on_rank_zero():
            self.ds = complete_ds_config(load_ds_config(ds_config_path), cfg, self.world,
                                         source=f"--deepspeed {ds_config_path}" if ds_config_path else "default")
        with self._warnings_on_rank_zero():
            check_precision_on_device(self.ds, get_accelerator())
        check_offload_on_device(self.ds, get_accelerator(), cfg.quantize)
        if nvme_offloads(self.ds):  # DeepSpeed 0.19.8's NVMe swapping: a crash at step 2, checkpoints that
            patch_deepspeed_nvme()  # lose weights; installed before any model is built (zero.Init swaps too)
        self.fp16 = uses_fp16(self.ds)
        # Without ZeRO and in fp32 DeepSpeed records no gradient norm: the trainer computes it (see below).
        self.own_grad_norm = zero_stage(self.ds) == 0 and not (uses_bf16(self.ds) or self.fp16)
        self.grad_norm = None
        # --compile: the phases whose first step and first evaluation were reported, and the last report
        self._compile_reports: set[tuple[str, str]] = set()
        self._compile_reported = None
        self.ckpt_dir = self.out / "checkpoints"
        self.data_dir = self._prepare_data()
        manifest_vocab = load_manifest(self.data_dir)["vocab_size"]
        if self.rank == 0 and (unused := unused_vocab_size(cfg, manifest_vocab)):
            warnings.warn(unused, ConfigWarning, stacklevel=2)
        cfg.vocab_size = manifest_vocab  # the effective config records what the run uses
        with self._warnings_on_rank_zero():
            self.model_config, manifest = check_model_and_data(cfg, self.data_dir, manifest_vocab)
        check_nvme_swap_buffers(cfg, self.ds, self.model_config, self.world)
        self.tokenizer_path, self.tokenizer_sha256 = manifest["tokenizer_path"], manifest["tokenizer_sha256"]
        self.eos_id = manifest["eos_id"]  # where a document ends (--document-masking)
        check_document_masking(cfg, manifest, self.data_dir)
        self.total_steps = total_steps_for(cfg, resume_progress(self.ckpt_dir, cfg.resume_from)
                                           if cfg.resume and cfg.token_budget else None)
        self.relora_start = self.cycle_start = cfg.warm_start_steps
        self.cycles_before, self.reset_on_resume = 0, False
        # a resume's once the checkpoint's cycles are known (below: whether the first reset after them would cut
        # into the warmup depends on them)
        self.schedule = None if cfg.resume else build_schedule(cfg, self.total_steps)
        with self._warnings_on_rank_zero():  # a split too small for a window or a global batch: named here
            check_data_use(cfg, self.total_steps, manifest["splits"], str(self.data_dir), self.world)
        # A prepared dir, or a mixture of several (relora_ds.data.mixture: the seed draws its members' shuffles)
        self.train_data = open_split(self.data_dir, "train", seq_len=cfg.seq_len, access="random", seed=cfg.seed)
        with warnings.catch_warnings():  # a mixture member left out of evaluation: check_data_use named it
            warnings.simplefilter("ignore", DataWarning)
            self.val_data = open_eval_split(self.data_dir, seq_len=cfg.seq_len) if cfg.eval_every else None
        # What each checkpoint records of the training data, and --resume compares (plan_resume).
        self.data_info = train_data_record(manifest, cfg.seq_len)
        on_cuda = self.pin_batches = torch.cuda.is_available() and get_accelerator().device_name() == "cuda"
        # On a GPU, batches in page-locked memory: their copies to the device do not stall the host.
        self.batches = ShardedBatches(self.train_data, cfg.micro_batch_size, rank=self.rank,
                                      world_size=self.world, seed=cfg.seed,
                                      accumulation_steps=cfg.global_batch_size // (cfg.micro_batch_size * self.world),
                                      prefetch=cfg.data_prefetch, pin_memory=on_cuda)
        self.tokens_per_step = cfg.global_batch_size * cfg.seq_len
        # MFU's denominator: the recipe's peak_tflops, else the table's dense bf16/fp16 peak of this GPU when
        # training in bf16/fp16 (fp32 has none).
        self.peak_tflops = cfg.peak_tflops or (
            mfu_peak(torch.cuda.get_device_name(), half=uses_bf16(self.ds) or self.fp16, warn=self.rank == 0)
            if on_cuda else None)
        self.resume_plan = None if not cfg.resume else plan_resume(
            self.ckpt_dir, model=self.model_config.to_dict(), train=cfg.to_dict(), ds=self.ds, world=self.world,
            data_dir=self.data_dir, tokenizer_sha256=self.tokenizer_sha256, data=self.data_info,
            total_steps=self.total_steps)
        if self.resume_plan is not None:
            self._resume_cycles(self.resume_plan)
        if self.schedule is None:
            self.schedule = build_schedule(cfg, self.total_steps, self.cycle_start)
        if cfg.overwrite:  # only now that every check has passed: a refused run deletes nothing
            self._clear_output_dir()
        if cfg.resume_from:
            self._rewind()
        self.step = 0
        self.tokens_seen = 0  # trained tokens so far: a sum, as global_batch_size may change on resume
        self.engine = None
        resume_step = None if not cfg.resume else (
            0 if self.resume_plan is None else checkpoint.tag_step(self.resume_plan["tag"]))
        self.environment = run_info.environment(self.world) if self.rank == 0 else None  # rank 0 records
        self.metrics = MetricsLogger(self.out, enabled=False)  # other ranks log nothing

        def start_logs():  # W&B's start in particular can fail on rank 0 alone: on_rank_zero stops every rank
            run_info.append(self.out, {**self.environment, "resume_step": resume_step})
            self.metrics = MetricsLogger(self.out, enabled=True, resume_step=resume_step,
                                         wandb_project=cfg.wandb_project, run_config=self._run_config())
        on_rank_zero(start_logs)
        if self.metrics.rewound:
            self._print(f"resuming from step {resume_step}: the {self.metrics.rewound} metrics records the previous "
                        f"run logged after it moved to {self.out / MetricsLogger.REWOUND}")
        if cfg.warm_start_from and cfg.warm_start_data == "continue" and self.resume_plan is None:
            with self._warnings_on_rank_zero():
                self._continue_warm_start_data()
        self._install_stop_handlers(early_stop)

    def close(self) -> None:
        """Release what the run holds in this process: the output_dir lock and the signal handlers (for a
        Trainer built in a notebook or test; launch/train.py calls it on every exit path)."""
        self._restore_signal_handlers()
        if self._took_lock:  # not one an earlier Trainer in this process holds (still live: it keeps its lock)
            unlock_output_dir(self.out)

    @contextlib.contextmanager
    def _warnings_on_rank_zero(self):
        """Every rank runs a check (an error must stop all); one prints its warnings."""
        with warnings.catch_warnings():
            if self.rank != 0:
                warnings.simplefilter("ignore")
            yield

    def _clear_output_dir(self) -> None:
        """--overwrite: the previous run's checkpoints, metrics, TensorBoard logs, export and plot go
        (output_dir.clear_previous_run: what cannot be deleted stops the run, named)."""
        on_rank_zero(lambda: clear_previous_run(self.out, ("checkpoints", "tensorboard", "hf", "wandb", "metrics.jsonl",
                                                           MetricsLogger.REWOUND, MetricsLogger.WANDB_ID,
                                                           "run_info.jsonl", "curves.png")))

    # ---------------------------------------------------------------- setup
    def _prepare_data(self) -> Path:
        cfg = self.cfg
        if cfg.data_dir is not None:
            path = Path(cfg.data_dir)
            what = f"data_dir {path}"
            fix = "put it on a filesystem every node mounts, or give every node the same copy"
        else:
            from .data import prepare_data  # imports Hugging Face datasets: only the runs that prepare

            vocab = cfg.vocab_size or BUILTIN_VOCAB_SIZE
            path = builtin_data_dir(vocab)
            # One process tokenizes (its error stops every rank); the others wait and read. relora_ds's cache.
            try:
                on_rank_zero(lambda: prepare_data(None, path, vocab_size=vocab, seq_len=cfg.seq_len, overwrite=True))
            except ValueError as e:  # the path is not one the user typed: say where it comes from
                if str(path) not in str(e):  # another failure (another rank's view of rank 0's error, ...)
                    raise
                cache = os.environ.get("RELORA_DATA_CACHE")
                raise ValueError(f"{e} [the built-in corpus's cache, "
                                 + (f"from RELORA_DATA_CACHE={cache}" if cache else "the default ~/.cache/relora_ds")
                                 + ": set RELORA_DATA_CACHE to a writable directory, or pass --data-dir]") from None
            what = f"the built-in corpus that rank 0 prepared in {path}"
            fix = ("on several nodes set RELORA_DATA_CACHE to a directory all nodes share, or prepare data once "
                   "(launch/prepare_data.py) and pass --data-dir")
        # Each node reads its own view of `path`: a node-local cache or copy that is missing, or holds data of
        # another recipe or tokenizer, must stop every rank, not train some ranks on other data.
        manifest = read_manifest_file(path)
        identity = None if manifest is None else json.dumps(
            {k: manifest.get(k) for k in ("recipe", "tokenizer_sha256", "vocab_size", "splits")}, sort_keys=True)
        missing, differ = agreement(identity)
        if missing and self.world > 1:  # one process: load_manifest names what is wrong with the directory
            who = f"rank {self.rank} on {socket.gethostname()}" if manifest is None else "another rank"
            raise ValueError(f"{who} cannot see {what} (every rank stops): {fix}")
        if differ:
            raise ValueError(f"the ranks read different prepared data as {what} (its manifest, tokenizer or "
                             f"token counts differ between nodes; every rank stops): {fix}")
        return Path(os.path.abspath(path))  # checkpoints record it: launch/export.py runs from anywhere

    def _run_config(self) -> dict:
        return {"train": self.cfg.to_dict(), "model": self.model_config.to_dict(), "deepspeed": self.ds,
                "world_size": self.world, "data_dir": str(self.data_dir), "tokenizer_sha256": self.tokenizer_sha256,
                "data": self.data_info, "optimizer_groups": list(checkpoint.OPTIMIZER_GROUPS),
                "dropout_streams": DROPOUT_STREAMS, "environment": self.environment}

    # ---------------------------------------------------------------- loop
    def start(self) -> None:
        """Build the engine, or load the checkpoint ``--resume`` names into it; once (``train`` calls it when
        the caller has not). launch/train.py calls it apart from ``train``, so that a ValueError here (a
        checkpoint that cannot continue, e.g. one saved before checkpoints recorded their data, on re-prepared
        data) is a one-line error like the start-up checks', not a traceback out of the training loop."""
        if self.engine is not None:
            return
        self._print("effective configuration:\n" + json.dumps(
            {k: v for k, v in self._run_config().items() if k != "environment"}, indent=2))  # that: run_info.jsonl
        if not (self.cfg.resume and self._resume()):
            self._build_engine(self._base_model(self._phase(0)), self._phase(0))
            self._source_masters()

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            self.batches.close()  # the read-ahead threads

    def _train(self) -> dict:
        cfg = self.cfg
        self.start()
        numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731  ZeRO-3: whole
        n_lora = numel(lora_parameters(self.engine.module))
        n_params = numel(self.engine.module.parameters()) - n_lora  # the model's own, in either phase
        self._print(f"model: {self.model_config.num_hidden_layers} layers, {n_params:,} parameters"
                    f"{f' (+ {n_lora:,} LoRA)' if n_lora else ''}; "
                    f"{self.world} rank(s), bf16={uses_bf16(self.ds)}, ZeRO stage "
                    f"{zero_stage(self.ds)}, offload: {offloaded(self.engine)}, "
                    f"{'zero.Init, ' if zero_init.partitions_at_build(self.ds, cfg.zero_init) else ''}"
                    f"{self.total_steps} steps, "
                    f"RELORA_KERNELS={relora_kernels.kernel_mode()}")
        # A terminal gets the bar; a log file (SLURM's .out) a plain line per metrics record instead.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or not interactive,
                   dynamic_ncols=True)
        started, first_step = time.perf_counter(), self.step
        final = {}
        # Throughput counts training steps and their merges and resets, not evaluation, checkpoints or the
        # warm-start switch (each step ends in an all-reduce read on the host, so the clock sees the device);
        # with --compile the first step of each phase includes its compilation (README, "Outputs").
        # A record covers the steps since the last one (log_every): their mean loss, as Megatron and the HF
        # Trainer log; lr and grad_norm are its last step's. A window ends at the warm-start switch too, so
        # that no record mixes the phases, at a stop and at each evaluation (a stop may come during one), so
        # that no trained step goes unlogged, and at each checkpoint, so that a run resumed from it logs the
        # records the uninterrupted run logged.
        train_s, step_last, loss_sum = 0.0, self.step, 0.0
        # A signal during start-up (the checkpoint load, the engine): stop before training a step; nothing has
        # changed since the checkpoint resumed from (or since nothing), so nothing is saved.
        if self.step < self.total_steps and self._stop_agreed_now():
            return self._stopped(bar, saved=False)
        if self._evaluation_owed():  # the run resumed from was killed during the evaluation of this step
            final = self.evaluate(final=self.step == self.total_steps)
            if self.step < self.total_steps and self._stop_agreed_now():
                return self._stopped(bar, saved=False)
        while self.step < self.total_steps:
            if self.engine_phase == "full" and self._phase(self.step) == "lowrank":
                self._switch_to_lowrank()
            t0 = time.perf_counter()
            loss_sum += self._train_step()
            if cfg.compile and (self.engine_phase, "step") not in self._compile_reports:
                self._report_compile("step", self.step + 1)
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            self._after_step_events()
            train_s += time.perf_counter() - t0
            save_due = (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps \
                or self._warm_start_save_due()
            eval_due = self._evaluation_due(self.step)
            if (self.step % cfg.log_every == 0 or save_due or eval_due or self._stop_agreed
                    or (self.engine_phase == "full" and self._phase(self.step) == "lowrank")):
                tok_s = (self.step - step_last) * self.tokens_per_step / train_s
                loss = loss_sum / (self.step - step_last)
                train_s, step_last, loss_sum = 0.0, self.step, 0.0
                grad_norm = self.grad_norm if self.grad_norm is not None else self.engine.get_global_grad_norm()
                tflops = tok_s * self.flops_per_token / self.world / 1e12  # model TFLOP/s per rank
                rec = {"step": self.step, "loss": loss, "lr": self.step_lr, "grad_norm": _float(grad_norm),
                       "tokens_per_s": tok_s, "tokens_seen": self.tokens_seen, "tflops_per_gpu": tflops,
                       **({"mfu": tflops / self.peak_tflops} if self.peak_tflops else {}),
                       "peak_memory_mb": max_over_ranks(peak_memory_mb()), "phase": self.engine_phase}
                self.metrics.log(rec)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok_s:.0f}",
                                **self._cycle_position())
                if not interactive:
                    self._print(progress_line(rec, self.total_steps, time.perf_counter() - started,
                                              self.step - first_step, self._cycle_position()))
            bar.update(1)
            if self._stop_agreed:  # the checkpoint first: SLURM's warning gives 120 s
                self.save()
                if self.step == self.total_steps and cfg.eval_every:  # the run's last, once its checkpoint is safe
                    self.evaluate(final=True)
                return self._stopped(bar, saved=True)
            if save_due:  # before the evaluation (the final one may read ~100M tokens): a kill there loses no step
                self.save()
            if eval_due:
                final = self.evaluate(final=self.step == self.total_steps)
                if self.step < self.total_steps and self._stop_agreed_now():
                    # a signal that came during the evaluation: stop here, not after one more step and save
                    if not save_due:
                        self.save()
                    return self._stopped(bar, saved=True)
        bar.close()
        if cfg.export:
            self.export(self.out / "hf")
        self.metrics.close()
        return final

    def _evaluation_due(self, step: int) -> bool:
        """Whether the validation loss is measured after `step` (eval_every, and the run's last step)."""
        return bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or step == self.total_steps)

    def _evaluation_owed(self) -> bool:
        """Whether this run resumed from a checkpoint whose step was due an evaluation that metrics.jsonl
        lacks: a stop signal left it to this run, or the job was killed during it (an evaluation runs after
        its step's checkpoint is saved; the final one may read ~100M tokens). Resumed at total_steps, the run
        would otherwise end without its final validation loss. Rank 0 reads the log; every rank learns the
        answer."""
        if self.step == 0 or not self._evaluation_due(self.step):
            return False
        return self._any_rank(self.rank == 0 and not self.metrics.logged(self.step, "val_loss"))

    def _cycle_position(self) -> dict:
        """{"cycle": k/of, "in_cycle": j/length} of the step just done; empty outside ReLoRA's cycles."""
        if self.cfg.mode != "relora":
            return {}
        return cycle_position(self.step, self.cycle_start, self.cfg.cycle_length, self.total_steps, self.cycles_before)

    def _after_step_events(self) -> None:
        if self.engine_phase == "lowrank":
            event = reset_hook.after_step(self.engine, self.step, self.cfg, self.cycle_start)
            if event:
                self._event(event)

    def evaluate(self, final: bool = False) -> dict:
        """Validation loss on eval_windows windows spread over the split (final_eval_windows for the run's `final`
        one)."""
        start = time.perf_counter()
        windows = self.cfg.eval_windows
        if final and self.cfg.final_eval_windows is not None:
            windows = self.cfg.final_eval_windows
        val_loss, tokens, members = validation_losses(
            self.engine, self.val_data, self.cfg.micro_batch_size, self.rank, self.world,
            num_windows=windows or None, prefetch=self.cfg.data_prefetch, pin_memory=self.pin_batches)
        rec = {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
               "val_tokens": tokens, **{f"val_loss/{label}": loss for label, loss in members.items()},
               "eval_seconds": time.perf_counter() - start}
        self.metrics.log(rec)
        each = "".join(f"; {label} {loss:.4f}" for label, loss in members.items())  # a mixture's members
        self._print(f"step {self.step}: validation loss {val_loss:.4f}, perplexity {rec['val_ppl']:.2f}{each}")
        if self.cfg.compile and (self.engine_phase, "evaluation") not in self._compile_reports:
            self._report_compile("evaluation", self.step)
        return rec

    def export(self, out_dir: Path) -> Path:
        """Merged Hugging Face directory (the model's family) of the current weights (all ranks call; rank 0 writes)."""
        model = model_from_engine(self.engine, keep=self.rank == 0)  # every rank gathers; rank 0 writes

        def write():  # its error (a full disk, say) stops every rank instead of leaving them at a barrier
            progress = with_merge_record(self.progress(), model, self.engine.module)
            _, notes = export_run(model, out_dir, self.cfg.to_dict(), self.tokenizer_path, progress=progress)
            self._print(f"exported the Hugging Face model to {out_dir}")
            for note in notes:
                self._event({"event": "warning", "step": self.step, "message": f"export to {out_dir}: {note}"})
        on_rank_zero(write)
        return out_dir

    def _report_compile(self, after: str, step: int) -> None:
        """After the first step and the first evaluation of each phase (--compile): a ``compiled`` event with
        what torch.compile made of the decoder layers so far in the phase (compile_stats), and a warning for
        each new graph break or recompile-limit hit (past which a layer runs eagerly)."""
        self._compile_reports.add((self.engine_phase, after))
        stats, last = compile_stats(), self._compile_reported
        self._compile_reported = stats
        self._event({"event": "compiled", "step": step, "phase": self.engine_phase, "after": after, **stats,
                     "cache_entries": cache_entries(self.engine.module), "recompile_limit": recompile_limit()})
        if self.rank == 0:
            for message in compile_warnings(stats, last):
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _event(self, rec: dict) -> None:
        self.metrics.log(rec)
        if self.rank == 0:
            details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                                if k not in ("event", "step"))
            tqdm.write(f"[step {rec['step']}] {rec['event']}" + (f": {details}" if details else ""))

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg)


def _float(x) -> float | None:
    return None if x is None else float(x)
