"""The one training loop of sam4med: every trainer is a :class:`TrainingTask` (what to train, its
batches, one step, validation); the loop owns the rest (resume, seeding, checkpoints, history,
progress), the way micro-sam's and nnU-Net's trainers do.

A run folder holds ``config.json`` (checked on resume), ``split.json``, ``history.jsonl`` (one row
per epoch), ``best.pt`` (the best validation Dice) and ``last.pt`` (everything to resume), both in the
layout of :mod:`sam4med.engine.checkpoints`. Each epoch's randomness depends only on (seed, epoch),
so a run killed and started again trains exactly as one that was never stopped. An epoch longer than
``CHECKPOINT_MINUTES`` also saves ``last.pt`` in its course (the steps done, their losses and the random
generators' states), so a kill loses at most those minutes, not the epoch. With a patience, a run
stops once that many epochs have passed without a better validation Dice (early stopping); the rule is
read from the saved loop state, so a stopped run stays stopped when started again.

Under ``torchrun --nproc-per-node N`` the same loop trains on N processes (``engine.distributed``): each
takes its share of every batch, DistributedDataParallel averages the gradients, rank 0 writes; a run
resumes on any number of processes.
"""

from __future__ import annotations

import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from torch import nn

from sam4med.engine.checkpoints import read_trained_checkpoint, save_checkpoint
from sam4med.engine.datasets import Sample
from sam4med.engine.distributed import Processes, barrier, leaders_value, mean_over_processes, processes, shard, wrap
from sam4med.engine.errors import InputError, check_apart, check_precision
from sam4med.engine.runtime import precision_autocast
from sam4med.engine.runs import (
    CONFIG_FILE,
    HISTORY_FILE,
    SPLIT_FILE,
    append_jsonl,
    check_split,
    claim_folder,
    sole_writer,
    warn,
    write_split,
    write_text_atomic,
)

BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
CHECKPOINT_MINUTES = 10.0  # in a long epoch, last.pt is saved again once this much training time has passed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_states() -> dict[str, object]:
    """Python's, NumPy's and PyTorch's global generators (CUDA's too once it is in use), in types a
    ``weights_only`` load accepts."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, object] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Mapping[str, Any]) -> None:
    """The generators as :func:`random_states` saved them (CUDA's where as many devices are here)."""
    python, numpy_state = states["python"], states["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def run_record(config: Mapping[str, object]) -> dict[str, object]:
    """``config`` as a run folder records it: fp32 is written as an unset precision, as runs made before the
    setting existed hold it (``claim_folder`` matches an absent setting with None), so "fp32" and None resume
    each other's runs."""
    return {**config, "precision": None} if config.get("precision") == "fp32" else dict(config)


def start_run(out: Path, config: Mapping[str, object], splits: Mapping[str, Mapping[str, list[Sample]]]) -> None:
    """Claim ``out`` for ``config`` (a rerun with the same config resumes) and record the split (rank 0
    under torchrun; the others wait for it)."""
    samples = [sample for sides in splits.values() for side in sides.values() for sample in side]
    check_apart(out, {sample.image_path.parent for sample in samples}  # where the data sets' images and masks are
                | {sample.mask_path.parent for sample in samples if sample.mask_path is not None},
                roots={sample.image_path.parent.parent for sample in samples})
    check_split(out, splits)
    group = processes()
    if group.leader:
        claim_folder(out, CONFIG_FILE, run_record(config))
        write_split(out, splits)
    barrier(group)


class Batches(Protocol):
    """An epoch's batches: a list, or a DataLoader (which knows its length)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[object]: ...


class TrainingTask(ABC):
    """What one method trains. ``module`` holds every parameter and buffer that changes in training."""

    kind: str  # the checkpoint kind (see engine.checkpoints)
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    updates_per_batch: int = 1  # optimiser updates per batch (SAMAug's dual input, alternated, takes two)
    unused_parameters: bool = False  # whether a step may leave some trained parameters out (torchrun needs to know)

    @abstractmethod
    def batches(self, epoch: int, rng: np.random.Generator) -> Batches:
        """The epoch's batches, drawn with ``rng`` (seeded by the loop from seed and epoch)."""

    @abstractmethod
    def loss(self, batch: object, update: int = 0) -> torch.Tensor:
        """The differentiable loss of update ``update`` on a batch, a mean over the batch's items (under
        torchrun, over this process's share of them), computed with ``module``'s parameters."""

    @abstractmethod
    def validate(self) -> float:
        """Mean validation Dice of the current weights."""

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """What ``best.pt`` stores; by default the whole module."""
        return self.module.state_dict()

    def checkpoint_meta(self) -> dict[str, object]:
        """Whatever a loader needs beside the config to rebuild the model (backbone, channels, ...)."""
        return {}


class _TaskLoss(nn.Module):
    """A task's loss as a module's forward, the call DistributedDataParallel synchronises gradients through."""

    def __init__(self, task: TrainingTask):
        super().__init__()
        self.trained = task.module
        self.task = [task]  # in a list: not a submodule

    def forward(self, batch: object, update: int) -> torch.Tensor:
        return self.task[0].loss(batch, update)


def _train_step(task: TrainingTask, model: nn.Module, batch: object, group: Processes, precision: str) -> float:
    """The task's updates on this process's share of a batch; the loss averaged over the processes. With
    ``precision="bf16"`` the forward pass runs under bfloat16 autocast (the weights, their gradients and the
    optimiser stay fp32)."""
    total = 0.0
    device_type = next(task.module.parameters()).device.type
    for update in range(task.updates_per_batch):
        task.optimizer.zero_grad()
        with precision_autocast(device_type, precision):
            loss = model(shard(batch, group), update).float()
        if not loss.requires_grad:  # nothing trained was reached: every process must still take part
            loss = loss + sum(p.sum() * 0 for p in task.module.parameters() if p.requires_grad)
        loss.backward()
        task.optimizer.step()
        total += loss.item()
    return mean_over_processes(total, group)


@dataclass
class TrainResult:
    out: Path
    best_val_dice: float
    best_epoch: int
    seconds: float
    epochs_run: int
    stopped_early: bool = False


def plateaued(loop: Mapping[str, float], patience: int | None) -> bool:
    """Whether ``patience`` epochs have passed since the best validation Dice (never without a patience, nor before
    the first epoch has set a best)."""
    return bool(patience) and loop["best_epoch"] >= 1 and loop["epoch"] - loop["best_epoch"] >= patience  # type: ignore[operator]


def fit(task: TrainingTask, out: Path, config: Mapping[str, object], epochs: int, seed: int,
        description: str, show_progress: bool = True, patience: int | None = None,
        checkpoint_minutes: float = CHECKPOINT_MINUTES) -> TrainResult:
    """Train ``task`` for at most ``epochs`` in ``out``, continuing from ``last.pt`` when it is there
    (``out`` is claimed for ``config`` first, as :func:`start_run` does), mid-epoch if it was saved there;
    with ``patience``, stop early once that many epochs have not improved the best validation Dice. The
    learning-rate schedule is the task's, over ``epochs``, whether or not the run stops early.
    ``config["precision"]`` (unset or "fp32") is the training steps' arithmetic; validation always runs in
    fp32, as the model is used afterwards. Within an epoch, ``last.pt`` is saved each time
    ``checkpoint_minutes`` of training have passed since the last save."""
    precision = str(config.get("precision") or "fp32")
    check_precision(precision)
    config = run_record(config)  # what config.json and the checkpoints hold
    group = processes()
    if group.leader:
        claim_folder(out, CONFIG_FILE, config)
    with sole_writer(out) if group.leader else nullcontext():  # a second run would train from the same last.pt
        barrier(group)
        run = _Run(task, out, {"kind": task.kind, "config": dict(config), "meta": task.checkpoint_meta()}, group,
                   precision, checkpoint_minutes)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn(), disable=not (show_progress and group.leader)) as progress:
            log = _EpochLog(progress, progress.add_task(description, total=None, status=""), description,
                            show_progress and not progress.console.is_terminal)  # a log file (nohup, a batch job)
            loop = run.train(epochs, seed, patience, log)
    return TrainResult(out, loop["best_val_dice"], loop["best_epoch"], loop["seconds"], loop["epoch"],
                       plateaued(loop, patience) and loop["epoch"] < epochs)


@dataclass
class _EpochLog:
    """Where a run reports: the progress bar, and one printed line per epoch when the output is no terminal."""

    progress: Progress
    bar: TaskID
    description: str
    print_epochs: bool


@dataclass
class _Run:
    """A claimed run folder and what each of its epochs needs: the task, the part of every checkpoint that stays
    the same (kind, config, meta), the processes, the steps' arithmetic and how often a long epoch is saved."""

    task: TrainingTask
    out: Path
    record: dict[str, object]
    group: Processes
    precision: str
    checkpoint_minutes: float

    def train(self, epochs: int, seed: int, patience: int | None, log: _EpochLog) -> dict:
        """The epochs from where ``last.pt`` left off; the loop state at the end (epoch, best, seconds)."""
        loop = self.resume()
        model = wrap(_TaskLoss(self.task), self.group, self.task.unused_parameters)
        self.task.module.train()
        partial = loop.pop("partial", None)  # the epoch a mid-epoch last.pt was saved in
        for epoch in range(loop["epoch"], epochs):
            if plateaued(loop, patience):
                break
            start = time.perf_counter()
            seed_everything(seed * 100_003 + epoch)
            batches = self.task.batches(epoch, np.random.default_rng([seed, epoch]))
            done = 0 if partial is None else partial["steps"]
            log.progress.update(log.bar, total=epochs * len(batches), completed=epoch * len(batches) + done)
            losses, carried = self.train_epoch(model, batches, epoch, loop, partial, start, log)
            partial = None
            self.task.scheduler.step()
            if self.group.leader:
                val_dice = self.validate()
            elapsed = carried + time.perf_counter() - start
            loop["seconds"] += elapsed
            loop["epoch"] = epoch + 1
            if self.group.leader:
                self.end_epoch(loop, val_dice, float(np.mean(losses)), round(elapsed, 2))
                log.progress.update(log.bar, status=f"loss {np.mean(losses):.3f} val Dice {val_dice:.3f}")
                if log.print_epochs:
                    log.progress.console.print(
                        f"{log.description}: epoch {epoch + 1}/{epochs}, loss {np.mean(losses):.4f}, validation Dice "
                        f"{val_dice:.4f} (best {loop['best_val_dice']:.4f} at epoch {loop['best_epoch']}), "
                        f"{elapsed / 60:.1f} min", highlight=False, soft_wrap=True)
            loop = leaders_value(loop, self.group)  # rank 0's validation decides; also waits for its checkpoint
        return loop

    def resume(self) -> dict:
        """The loop state ``last.pt`` holds, with the task's module, optimiser and schedule put back (a fresh state
        when there is none); ``history.jsonl`` made to agree with it."""
        loop = {"epoch": 0, "best_val_dice": -1.0, "best_epoch": -1, "seconds": 0.0}
        last_path = self.out / LAST_FILE
        if last_path.is_file():
            resume = read_trained_checkpoint(last_path, self.task.kind)["resume"]
            self.task.module.load_state_dict(resume["module"])
            self.task.optimizer.load_state_dict(resume["optimizer"])
            self.task.scheduler.load_state_dict(resume["scheduler"])
            loop = resume["loop"]
            if loop["best_epoch"] >= 1 and not (self.out / BEST_FILE).is_file():  # written before last.pt: moved
                raise InputError(f"{self.out / BEST_FILE}: missing, though {LAST_FILE} records epoch "
                                 f"{loop['best_epoch']} as the best; put it back, or train again into another --out")
        if self.group.leader:
            _keep_history(self.out / HISTORY_FILE, loop)
        return loop

    def train_epoch(self, model: nn.Module, batches: Batches, epoch: int, loop: dict, partial: dict | None,
                    start: float, log: _EpochLog) -> tuple[list[float], float]:
        """One epoch's steps; its losses and the seconds it had trained before a kill. The steps a mid-epoch
        ``last.pt`` records (``partial``) are drawn again, so the draws stay in step, but not trained."""
        done, losses, carried = (0, [], 0.0) if partial is None else \
            (partial["steps"], list(partial["losses"]), partial["seconds"])
        saved = time.perf_counter()
        for step, batch in enumerate(batches, 1):
            if step <= done:
                if step == done:
                    set_random_states(partial["random"])  # type: ignore[index]
                continue
            losses.append(_train_step(self.task, model, batch, self.group, self.precision))
            if not math.isfinite(losses[-1]):  # stop before a checkpoint keeps the broken weights
                raise InputError(f"{self.out}: the training loss became {losses[-1]} at epoch {epoch + 1}, step "
                                 f"{step}; lower --learning-rate (the run keeps epoch {loop['epoch']})")
            log.progress.update(log.bar, advance=1, status=f"loss {losses[-1]:.3f}")
            if step < len(batches) and leaders_value(time.perf_counter() - saved >= 60 * self.checkpoint_minutes,
                                                     self.group):
                if self.group.leader:
                    self.save_last({**loop, "partial": {"steps": step, "losses": losses, "random": random_states(),
                                                        "seconds": carried + time.perf_counter() - start}})
                saved = time.perf_counter()
        return losses, carried

    def validate(self) -> float:
        """The task's validation Dice in eval mode (rank 0's work); refused when there was nothing to score."""
        self.task.module.eval()
        val_dice = self.task.validate()
        self.task.module.train()
        if not math.isfinite(val_dice):  # a mean over no object: nothing to pick the best epoch by
            raise InputError(f"{self.out / SPLIT_FILE}: the validation images hold no object to score (validation "
                             f"Dice {val_dice}): their masks are empty, too small or unreadable (a warning above "
                             "names each unreadable one); mend them, or give more images")
        return val_dice

    def end_epoch(self, loop: dict, val_dice: float, loss: float, seconds: float) -> None:
        """Best and last checkpoints and the history row of an epoch (rank 0's work)."""
        if val_dice > loop["best_val_dice"]:
            loop.update(best_val_dice=val_dice, best_epoch=loop["epoch"])
            save_checkpoint(self.out / BEST_FILE, {**self.record, "weights": self.task.trained_weights(),
                                                   "epoch": loop["epoch"], "val_dice": val_dice})
        row = {"epoch": loop["epoch"], "loss": loss, "val_dice": val_dice,
               "lr": self.task.scheduler.get_last_lr()[0], "seconds": seconds}
        # history first: a kill before last.pt is written leaves a row that the rerun drops and redoes
        append_jsonl(self.out / HISTORY_FILE, row)
        loop["history"] = [*loop.get("history", []), row]  # last.pt keeps the rows too: a cut file is written back
        self.save_last(loop, val_dice)

    def save_last(self, loop: dict, val_dice: float | None = None) -> None:
        """``last.pt``: everything to resume, at an epoch's end or (``loop["partial"]``) in its course."""
        save_checkpoint(self.out / LAST_FILE, {**self.record, "weights": self.task.trained_weights(),
                                               "epoch": loop["epoch"], "val_dice": val_dice,
                                               "resume": {"module": self.task.module.state_dict(),
                                                          "optimizer": self.task.optimizer.state_dict(),
                                                          "scheduler": self.task.scheduler.state_dict(),
                                                          "loop": loop}})


def _keep_history(path: Path, loop: dict) -> None:
    """``history.jsonl`` as ``last.pt`` holds it: rows of later epochs (written just before a kill) dropped, and
    rows that a cut or edited file lost written back from the checkpoint (one from before it kept them: said)."""
    if "history" in loop:
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in loop["history"]))
        return
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["epoch"] <= loop["epoch"]:
            rows.append(row)
    if missing := sorted(set(range(1, loop["epoch"] + 1)) - {row["epoch"] for row in rows}):
        warn(f"{path}: lacks the rows of epoch(s) {', '.join(map(str, missing))} that {LAST_FILE} holds; the "
             "curves and the record of the run miss them")
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
