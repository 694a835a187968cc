"""The trainer: fine-tune a multi-exit timm model on one machine or many, then evaluate and report it.

Recipes (the keys, shipped recipes, overrides) are `timm_exits.training.recipe`; this module runs one.

Methods (``method:``):

* ``baseline``: the plain backbone, trained on its own head only (`FinalExitLoss`); exits stay untrained.
* ``branchynet``: B-Net, the sum of per-exit cross-entropies (`BranchyNetLoss`); gates are not trained
  and inference uses entropy thresholds.
* ``soft``: the soft-conditional objective (`SoftConditionalLoss`) with deep supervision
  (``exit_weight``) and the cost weight warmed up linearly from 0 over the first ``cost_warmup``
  fraction of all steps (set on ``loss.cost_weight`` before every step).

``frozen_epochs`` adds a first stage that trains the exit heads and gates (and the backbone's
classifier, unless ``frozen_train_classifier: false``) on a frozen backbone held in eval mode, so its
BatchNorm statistics stay as they are; ``epochs`` of joint training follow.

Runs: ``train()`` writes a run folder (``run.json``, ``recipe.yaml``, ``checkpoint.safetensors``,
``train.log``, ``metrics.jsonl``, then ``report.json`` / ``report.md`` / ``plots/`` and ``model/``).
Checkpoints are safetensors files (model, EMA and optimizer tensors; everything else as JSON in
the header, all of it but the optimizer state also readable in ``checkpoint.json``), written in a
private folder and moved into place, at the end of every epoch and every ``checkpoint_every_steps``
steps. ``resume=True`` continues from the last one and ends with the same
weights as an uninterrupted run: data order and augmentation are seeded from (seed, epoch, sample),
mixup and dropout from (seed, step, rank), and learning rates and the cost weight are functions of the
step. A folder holding another run, or any run without ``resume`` / ``overwrite``, is an error.

Many processes: start with ``torchrun --nproc_per_node N -m timm_exits.training.cli train -c recipe.yaml``.
DistributedDataParallel (nccl on GPUs, gloo on CPUs); ``batch_size`` is the global batch, split
evenly over the processes, so N processes train the same model as one (exactly so without mixup,
cutmix or dropout, whose draws differ per process, and for backbones without BatchNorm, in a frozen
stage, or with ``sync_bn: true`` on GPUs); validation metrics are
summed over ranks; only rank 0 writes, and resuming needs the run folder on a shared file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core.losses import SoftConditionalLoss
from ..core.model import EarlyExitModel
from .build import build_model
from .checkpoint import CHECKPOINT_NAME, CheckpointError, _load_optimizer, _load_state, load_checkpoint, save_checkpoint
from .data import build_datasets, load_splits, make_loader, make_mixup
from .distributed import _agree, _all_sum, _Dist, _peer_errors, _setup_distributed
from .progress import RunLog, epoch_line, progress_enabled
from .recipe import Recipe, RecipeError, _diff, _fingerprint, _identity, load_recipe
from .report import _eval_keys_changed, evaluate
from .run_folder import _clear_run, _default_output, _prepare_run_dir, _write_run_files, run_lock
from .runfiles import atomic_write_text
from .sampling import seed_for
from .stages import (
    _autocast,
    _configure_stage,
    _make_loss,
    _make_optimizer,
    _schedule_lr,
    _set_modes,
    _stages,
    _warmup_note,
)
from .timing import machine_name
from .validation import _validate_epoch

__all__ = [
    "TrainingInterrupted",
    "train",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) at a step boundary, after writing a checkpoint to resume from."""


# ---------------------------------------------------------------------------------------- training
@dataclass
class _Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # within the epoch
    step: int = 0  # global optimizer steps
    done: bool = False


def train(
    config: str | os.PathLike | Mapping[str, Any] | Recipe | None = None,
    output: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Train a recipe and (on rank 0) write its report; see the module docstring.

    Args:
        config: Recipe file path, shipped recipe name, dict of flat or sectioned keys, or `Recipe` (None: the
            defaults, i.e. the digits data set).
        output: Run folder (default: ``runs/<name>-<method>``).
        resume: Continue the run in `output` from its last checkpoint.
        overwrite: Replace whatever run `output` holds.
        **overrides: Recipe keys to override (``data_dir="..."``, ``epochs=2``, ``**{"optim.lr": 0.1}``, ...).

    Returns:
        The run folder.

    Raises:
        RecipeError, RunFolderError, CheckpointError: a recipe, output folder or checkpoint that cannot
            work, before anything of an earlier run is changed.
        TrainingInterrupted: Ctrl-C, after a checkpoint to resume from was written.
    """
    recipe = load_recipe(config, overrides)
    d = _setup_distributed(recipe.runtime.device)
    run_dir = Path(output).expanduser() if output else _default_output(recipe)
    try:
        with contextlib.ExitStack() as held, _peer_errors(d):
            refused = None
            if d.main:
                try:
                    held.enter_context(run_lock(run_dir))
                except Exception as e:  # any error of rank 0's here must reach the other ranks
                    refused = e
            _agree(d, refused)  # every rank stops on a folder another process trains in
            if recipe.runtime.compile:  # compiled dropout draws eager's random numbers, so runs stay comparable
                held.enter_context(torch._inductor.config.patch(fallback_random=True))
            return _train(recipe, d, run_dir, resume, overwrite)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# An epoch's running sums, in this order (saved in mid-epoch checkpoints): the loss, its parts as the loss
# function reports them (`loss_fn.last`), and the number of steps summed.
_LOSS_PARTS = ("loss", "soft_ce", "exit_ce", "final_ce", "expected_cost", "steps")

_LOGGED_PARTS = {"soft": ("soft_ce", "exit_ce", "expected_cost"), "branchynet": (), "baseline": ("final_ce",)}


def _batch_per_rank(recipe: Recipe, d: _Dist) -> int:
    """Each process's share of the global batch, after the checks that depend on the processes and device."""
    data, optim = recipe.data, recipe.optim
    if data.batch_size % d.world:
        raise RecipeError(f"batch_size {data.batch_size} (global) does not split over {d.world} processes.")
    per_rank = data.batch_size // d.world
    if (data.mixup or data.cutmix) and per_rank % 2:
        raise RecipeError(f"mixup needs an even batch per process; batch_size / processes = {per_rank}.")
    if optim.amp == "fp16" and d.device.type != "cuda":
        raise RecipeError("amp: fp16 needs a CUDA device; use amp: bf16 on CPUs.")
    if optim.sync_bn and d.world > 1 and d.device.type != "cuda":
        raise RecipeError(
            "sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); on CPUs freeze BatchNorm with "
            "frozen_epochs or use a backbone without BatchNorm."
        )
    return per_rank


def _check_against_model(recipe: Recipe, model: EarlyExitModel) -> None:
    """Keys that only the built model can check, before anything is written: one BranchyNet weight per exit, and a
    calibration target the cheapest exit can meet."""
    weights = recipe.method.branchynet_weights
    if recipe.method.method == "branchynet" and weights is not None and len(weights) != model.num_exits:
        raise RecipeError(
            f"branchynet_weights has {len(weights)} weights but the model has {model.num_exits} exits "
            f"({', '.join(b.name for b in model.branches)} and the final one); give one weight per exit, the final "
            "exit last, or null for 1 each."
        )
    target = recipe.eval.calibrate_target_cost
    cheapest = float(model.exit_costs.min())
    if recipe.eval.report and target is not None and target < cheapest - 1e-9:
        raise RecipeError(
            f"calibrate_target_cost={target} is below the cheapest expected cost this model can reach, "
            f"{cheapest:.4f} (every image at exit #1); set calibrate_target_cost >= {cheapest:.4f}."
        )


class _Trainer:
    """One rank's side of a training run: set-up, stages, epochs, steps and checkpoints (see `train`)."""

    def __init__(self, recipe: Recipe, d: _Dist, run_dir: Path, resume: bool, overwrite: bool) -> None:
        self.recipe, self.d, self.run_dir = recipe, d, run_dir
        self.per_rank = _batch_per_rank(recipe, d)
        if recipe.runtime.threads:
            torch.set_num_threads(recipe.runtime.threads)

        # rank 0 checks the output folder and loads the data first (it may download); the others follow
        self.resuming, clear = self._on_rank0_first(
            lambda: _prepare_run_dir(run_dir, recipe, resume, overwrite), share=True
        )
        raw = self._on_rank0_first(lambda: load_splits(recipe.data), share=False)
        torch.manual_seed(recipe.seed)
        pretrained = False if self.resuming else None  # a resumed run's weights come from its checkpoint
        self.model = build_model(
            recipe.model,
            len(raw.classes),
            recipe.data.img_size,
            pretrained=pretrained,
            classifier_trained=bool(recipe.optim.epochs or recipe.optim.frozen_train_classifier),
        )
        self.data = build_datasets(recipe.data, self.model, raw, seed=recipe.seed)
        self.ckpt_path = run_dir / CHECKPOINT_NAME
        self.ckpt, self.ckpt_meta = self._restore_weights()
        _check_against_model(recipe, self.model)
        self._build_loop()
        kept: list[str] = []
        if d.main:  # everything above could still fail: only now is the old run's output deleted
            if clear:
                _, kept = _clear_run(run_dir)
            _write_run_files(run_dir, recipe, self.data.classes, d.world)
        self._place_model()

        self.pos = _Position(**self.ckpt_meta.get("position", {}))
        self.history: list[dict[str, Any]] = list(self.ckpt_meta.get("history", []))
        self.bars = progress_enabled(recipe.runtime.progress, d)
        self.log = RunLog(run_dir / "train.log" if d.main else None, self.bars)
        if kept:
            self.log(f"--overwrite: deleted the earlier run's files; left {len(kept)} other file(s) in place: {kept}")
        self._interrupted = False

    def _restore_weights(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Load the checkpoint of a resumed run (checking it was written by this recipe), or the recipe's
        `init_checkpoint`; returns the resumed checkpoint's tensor groups and metadata (empty otherwise)."""
        recipe = self.recipe
        if not self.resuming:
            if recipe.model.init_checkpoint:
                groups, _ = load_checkpoint(recipe.model.init_checkpoint)
                _load_state(self.model, groups.get("model", {}), str(recipe.model.init_checkpoint))
            return {}, {}
        groups, meta = load_checkpoint(self.ckpt_path)
        _load_state(self.model, groups.get("model", {}), str(self.ckpt_path))
        if meta.get("fingerprint") != _fingerprint(recipe):
            changes = _diff(_identity(meta.get("recipe", {})), _identity(recipe))
            raise CheckpointError(
                f"{self.ckpt_path} was written by another recipe than this run's"
                + (f" ({'; '.join(changes)})" if changes else "")
                + "; resume with the recipe it was written by, or train into a new --output folder."
            )
        return groups, meta

    def _build_loop(self) -> None:
        """The loaders, stages, mixup and loss of the run (every check that needs them included)."""
        d, data = self.d, self.recipe.data
        self.train_loader = make_loader(
            self.data.train,
            self.per_rank,
            train=True,
            num_replicas=d.world,
            rank=d.rank,
            seed=self.recipe.seed,
            num_workers=data.num_workers,
            pin_memory=d.device.type == "cuda",
        )
        self.val_loader = make_loader(
            self.data.val,
            data.eval_batch_size,
            train=False,
            num_replicas=d.world,
            rank=d.rank,
            num_workers=data.num_workers,
            pin_memory=d.device.type == "cuda",
        )
        self.steps_per_epoch = self.train_loader.sampler.batches_per_epoch
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"batch_size {data.batch_size} is larger than the train split ({len(self.data.train)} samples)."
            )
        self.stages = _stages(self.recipe.optim)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.mixup = make_mixup(data, self.data.num_classes, self.recipe.method.label_smoothing)
        self.loss_fn = _make_loss(self.recipe.method, self.mixup is not None)

    def _place_model(self) -> None:
        """Move the model to its device and memory format, and set up the EMA and the fp16 scaler."""
        optim, d = self.recipe.optim, self.d
        self.model.to(d.device)
        if optim.sync_bn and d.world > 1:  # replaces BatchNorm children in place; names and hooks stay
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if optim.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = None
        if optim.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=optim.ema_decay)
            if "ema" in self.ckpt:
                _load_state(self.ema.module, self.ckpt["ema"], str(self.ckpt_path))
        self.scaler = torch.amp.GradScaler("cuda") if optim.amp == "fp16" else None
        if self.scaler is not None and self.resuming and self.ckpt_meta.get("scaler"):  # one scaler spans the stages
            self.scaler.load_state_dict(self.ckpt_meta["scaler"])

    def _on_rank0_first(self, fn: Callable[[], Any], *, share: bool) -> Any:
        """Run `fn` on rank 0 first; its error, if any, is raised on every rank. Then the other ranks either
        receive rank 0's result (`share`, for small picklable values) or run `fn` themselves."""
        result, error = None, None
        if self.d.main:
            try:
                result = fn()
            except Exception as e:
                error = e
        _agree(self.d, error)
        if self.d.world > 1 and share:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        elif not self.d.main:
            result = fn()
        return result

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> bool:
        """Train every remaining stage; False when stopped early by ``stop_after_steps``."""
        r, d, pos = self.recipe, self.d, self.pos
        if d.main:
            n = (len(self.data.train), len(self.data.val), len(self.data.test))
            costs = [round(c, 3) for c in self.model.exit_costs.tolist()]
            self.log(
                f"{f'resuming at step {pos.step}' if self.resuming else 'starting'}: {r.model.model} with exits "
                f"{[b.name for b in self.model.branches]} (costs {costs}) on {r.data.dataset} ({n[0]} train / "
                f"{n[1]} val / {n[2]} test), method {r.method.method}, {d.world} process(es) on {d.device}, "
                f"{self.steps_per_epoch} steps per epoch, run folder {self.run_dir}"
            )
            if pos.done:
                self.log("training already finished; nothing to resume.")
        self.epoch_bar = None
        if self.bars and not pos.done:
            from tqdm import tqdm

            done = sum(s.epochs for s in self.stages[: pos.stage]) + pos.epoch
            self.epoch_bar = tqdm(total=self.total_epochs, initial=done, desc="epochs", position=0)
        previous = self._catch_sigint()
        try:
            while not pos.done:
                if not self._stage(pos.stage):
                    if d.main:
                        resume = (
                            "--resume continues from the last checkpoint."
                            if (self.run_dir / CHECKPOINT_NAME).exists()
                            else "no checkpoint was written yet (checkpoint_every_steps), so --resume cannot continue."
                        )
                        self.log(f"stopped after {pos.step} steps (stop_after_steps); {resume}")
                    return False
        finally:
            if previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, previous)
            if self.epoch_bar is not None:
                self.epoch_bar.close()
        return True

    def _catch_sigint(self) -> Any:
        """Make Ctrl-C stop at the next step boundary, after a checkpoint; returns the handler it replaced.

        Only in a single process run from the main thread (ranks of a distributed run would stop at
        different steps); a second Ctrl-C stops at once, as without this handler.
        """
        if self.d.world > 1 or threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_sigint = signal.default_int_handler if previous is None else previous
        return self._previous_sigint

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True
        signal.signal(signal.SIGINT, self._previous_sigint)
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once).", file=sys.stderr)

    def _stop(self) -> TrainingInterrupted:
        msg = (
            f"interrupted at step {self.pos.step}; checkpoint written, continue with --resume "
            f"(--output {self.run_dir})."
        )
        if self.d.main:
            self.log(msg)
        return TrainingInterrupted(msg)

    def _stage(self, si: int) -> bool:
        stage, pos = self.stages[si], self.pos
        n_trainable = _configure_stage(self.model, self.recipe.method.method, stage)
        opt, sched = _make_optimizer(self.model, self.recipe.optim, stage, self.steps_per_epoch)
        meta = self.ckpt_meta
        if self.resuming and meta.get("optimizer") and (pos.epoch or pos.batch):  # resumed inside this stage
            _load_optimizer(opt, self.ckpt.get("optim", {}), meta["optimizer"])
        net: nn.Module = self.model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        if self.recipe.runtime.compile:  # per stage: a frozen stage trains other parameters
            net = torch.compile(net)
        if self.d.main:
            self.log(
                f"stage {stage.name}: {stage.epochs} epoch(s), {n_trainable:,} trainable parameters, lr {stage.lr:g}"
            )
            if note := _warmup_note(self.recipe.optim, stage):
                self.log(note)
        first_epoch = sum(s.epochs for s in self.stages[:si])
        while pos.stage == si:
            if not self._epoch(si, first_epoch + pos.epoch, net, opt, sched, first_epoch * self.steps_per_epoch):
                return False
        return True

    def _epoch(self, si: int, global_epoch: int, net: nn.Module, opt, sched, stage_first_step: int) -> bool:
        r, d, pos, stage = self.recipe, self.d, self.pos, self.stages[si]
        self.data.train.set_epoch(global_epoch)
        self.train_loader.sampler.set_epoch(global_epoch, pos.batch)
        _set_modes(self.model, stage)
        t0 = time.time()
        saved = self.ckpt_meta.pop("accum", None) if self.resuming else None
        accum = torch.tensor(saved if saved and pos.batch else [0.0] * len(_LOSS_PARTS), dtype=torch.float64)
        bar = None
        if self.bars:
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch, initial=pos.batch, desc=f"epoch {global_epoch + 1}", leave=False, position=1
            )
        try:
            for x, y in self.train_loader:
                loss = self._step(net, opt, sched, x, y, stage_first_step)
                parts = self.loss_fn.last
                row = [loss, *(float(parts.get(k, 0.0)) for k in _LOSS_PARTS[1:-1]), 1.0]
                accum += torch.tensor(row, dtype=torch.float64)
                pos.step += 1
                pos.batch += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if r.runtime.stop_after_steps and pos.step >= r.runtime.stop_after_steps:
                    return False  # as if killed: no checkpoint
                if self._interrupted and pos.batch < self.steps_per_epoch:
                    self._checkpoint(opt, accum)
                    raise self._stop()
                every = r.runtime.checkpoint_every_steps
                if every and pos.step % every == 0 and pos.batch < self.steps_per_epoch:
                    self._checkpoint(opt, accum)
        finally:
            if bar is not None:
                bar.close()

        accum = _all_sum(accum.to(d.device), d).cpu() / d.world
        steps = max(float(accum[-1]), 1.0)
        train_stats = {"loss": float(accum[0]) / steps}
        for i, k in enumerate(_LOSS_PARTS[:-1]):
            if k in _LOGGED_PARTS[r.method.method]:
                train_stats[k] = float(accum[i]) / steps
        if isinstance(self.loss_fn, SoftConditionalLoss):
            train_stats["cost_weight"] = self.loss_fn.cost_weight
        val = _validate_epoch(self.ema.module if self.ema is not None else self.model, self.val_loader, d, r.optim)
        rec = {
            "epoch": global_epoch + 1,
            "epochs": self.total_epochs,
            "stage": stage.name,
            "step": pos.step,
            "lr": _schedule_lr(opt),
            "train": train_stats,
            "val": val,
            "seconds": time.time() - t0,
            # where this epoch ran: a resumed run may continue on another machine
            "runtime": {"machine": machine_name(d.device), "threads": torch.get_num_threads(), "processes": d.world},
        }
        self.history.append(rec)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if pos.epoch == stage.epochs:
            pos.stage, pos.epoch = si + 1, 0
            pos.done = pos.stage == len(self.stages)
        self._checkpoint(opt, None)
        if d.main:
            self.log(epoch_line(rec))
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)
        if self._interrupted:  # the last step of an epoch: stopped after its validation and checkpoint
            raise self._stop()
        return True

    def _step(self, net: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, stage_first_step: int) -> float:
        """One optimizer step; its randomness and learning rate depend only on the step number."""
        r, d, pos = self.recipe, self.d, self.pos
        x = x.to(d.device, non_blocking=True)
        y = y.to(d.device, non_blocking=True)
        if self.mixup is not None:
            np.random.seed(seed_for(r.seed, pos.step, d.rank, 2))  # timm's Mixup draws from numpy
            x, y = self.mixup(x, y)
        if r.optim.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(seed_for(r.seed, pos.step, d.rank, 1))
        if sched is not None:
            sched.step_update(num_updates=pos.step - stage_first_step)
        if isinstance(self.loss_fn, SoftConditionalLoss):
            warm = r.method.cost_warmup * self.total_steps
            self.loss_fn.cost_weight = r.method.cost_weight * (min(1.0, pos.step / warm) if warm > 0 else 1.0)
        with _autocast(r.optim.amp, d.device):
            out = net(x)
        loss = self.loss_fn(out, y)
        if not torch.isfinite(loss):
            parts = {k: float(v) for k, v in self.loss_fn.last.items()}
            raise FloatingPointError(
                f"loss is {loss.item()} at step {pos.step} (parts {parts}); lower lr, set clip_grad, or switch amp off."
            )
        opt.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if r.optim.clip_grad:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, r.optim.clip_grad)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if r.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, r.optim.clip_grad)
            opt.step()
        if self.ema is not None:
            self.ema.update(self.model, step=pos.step + 1)
        return float(loss.detach())

    def _checkpoint(self, opt: torch.optim.Optimizer, accum: torch.Tensor | None) -> None:
        """Save on rank 0; a mid-epoch checkpoint also keeps the epoch's loss sums (averaged over ranks)."""
        acc_list = None
        if accum is not None:
            accum.copy_(_all_sum(accum.to(self.d.device), self.d).cpu() / self.d.world)
            acc_list = accum.tolist()
        if self.d.main:
            meta = {
                "fingerprint": _fingerprint(self.recipe),
                "position": dict(self.pos.__dict__),
                "history": self.history,
                "accum": acc_list,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "recipe": self.recipe.flat(),  # flat keys, as run folders store them
            }
            ema = self.ema.module if self.ema is not None else None
            save_checkpoint(self.ckpt_path, self.model, meta, ema, opt)


def _train(recipe: Recipe, d: _Dist, run_dir: Path, resume: bool, overwrite: bool) -> Path:
    trainer = _Trainer(recipe, d, run_dir, resume, overwrite)
    start_step, t0 = trainer.pos.step, time.time()
    if not trainer.run():
        return run_dir
    log = trainer.log
    trained_now = trainer.pos.step > start_step
    if d.main and trained_now:
        log(f"training done in {time.time() - t0:.1f} s ({trainer.pos.step - start_step} steps)")
    if d.owns_group and dist.is_initialized():  # the report is rank 0's alone
        dist.barrier()
        dist.destroy_process_group()
        d.owns_group = False
    if d.main and recipe.eval.report:
        if not trained_now and (run_dir / "report.json").is_file():
            changed = _eval_keys_changed(run_dir / "report.json", recipe)  # never undo an `eval` on its own
            line = f"the report already exists: {run_dir / 'report.md'}"
            if changed:
                line += f"; it was made with other keys ({'; '.join(changed)}): `timm-exits eval {run_dir}` uses them"
            log(line)
        else:
            evaluate(run_dir, log=log)
    return run_dir
