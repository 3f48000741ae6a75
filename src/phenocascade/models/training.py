"""The training loop shared by the torch backends: seeding, progress, early stopping.

An epoch hook (:func:`epoch_hook`) sees every validation figure of every :func:`fit_loop`
run in its context, without any backend passing it along: a hyperparameter sweep reports
the curve to its pruner and aborts a trial that falls behind by raising from the hook.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from phenocascade.domain import Sample

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, float]], None]
# Reads a training sample's pixels, (H, W, C) uint8 or uint16.
Loader = Callable[[Sample], npt.NDArray[np.uint8] | npt.NDArray[np.uint16]]
# Called after each epoch's validation with (zero-based epoch, validation loss).
EpochHook = Callable[[int, float], None]
_EPOCH_HOOK: ContextVar[EpochHook | None] = ContextVar("phenocascade_epoch_hook", default=None)


@contextlib.contextmanager
def epoch_hook(hook: EpochHook) -> Iterator[None]:
    """Call ``hook(epoch, val_loss)`` after each validation of every fit in this context.

    The figure is a validation loss (lower is better): the one :func:`fit_loop` early-stops
    on, or what a backend with its own loop reports (:func:`report_epoch`). An exception
    raised by the hook aborts the fit and propagates to the caller of ``fit``: nothing is
    restored or saved. Contexts nest (the innermost hook is called) and are local to the
    thread or task that entered them.

    Parameters
    ----------
    hook : callable
        ``(epoch, val_loss) -> None``.
    """
    token = _EPOCH_HOOK.set(hook)
    try:
        yield
    finally:
        _EPOCH_HOOK.reset(token)


def report_epoch(epoch: int, val_loss: float) -> None:
    """Pass an epoch's validation loss to the hook of the enclosing :func:`epoch_hook`.

    :func:`fit_loop` calls it after each validation; a backend with its own training loop
    (Ultralytics') calls it from that loop's end-of-epoch callback. Nothing happens outside
    an :func:`epoch_hook` context.
    """
    hook = _EPOCH_HOOK.get()
    if hook is not None:
        hook(epoch, val_loss)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for augmentation draws."""
    random.seed(seed)
    # Libraries such as ultralytics draw from the global NumPy generator.
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class FitResult:
    """What :func:`fit_loop` learned.

    Attributes
    ----------
    train_loss : list of float
        Mean training loss per optimiser step (the loss history).
    val_loss : list of float
        Validation loss after each epoch.
    best_epoch : int
        Zero-based epoch whose weights were kept.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


def fit_loop(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[int], Iterable[Any]],
    train_step: Callable[[Any], torch.Tensor],
    val_loss: Callable[[], float],
    max_epochs: int,
    patience: int,
    progress: bool | ProgressCallback | None = None,
    description: str = "training",
) -> FitResult:
    """Train with early stopping on the validation loss and restore the best weights.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; ends holding the weights of the best validation epoch.
    optimizer : torch.optim.Optimizer
        Optimiser over ``model``'s parameters.
    epoch_batches : callable
        ``epoch -> iterable of batches``.
    train_step : callable
        ``batch -> scalar loss`` in training mode; the loop does backward and step.
    val_loss : callable
        Returns the validation loss (the model is put in eval mode by the callee if needed).
    max_epochs : int
        Upper bound on epochs.
    patience : int
        Stop after this many epochs without a better validation loss, counted once the
        loss has improved on its first epoch's value (a figure that has never moved, such
        as 1 - AP50 before a detector finds its first object, is no plateau).
    progress : bool, callable or None, default None
        ``True`` shows a rich progress bar; a callable receives
        ``{"epoch", "step", "train_loss", "val_loss"}`` after each epoch.
    description : str, default "training"
        Label of the progress bar.

    Returns
    -------
    FitResult
        Loss histories and the kept epoch.

    Notes
    -----
    After each validation the hook of the enclosing :func:`epoch_hook` context, if any,
    receives the epoch and its validation loss (:func:`report_epoch`).
    """
    result = FitResult()
    best = float("inf")
    first: float | None = None
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    bar = (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total} {task.fields[info]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        if progress is True
        else None
    )
    task = bar.add_task(description, total=max_epochs, info="") if bar else None
    if bar:
        bar.start()
    try:
        for epoch in range(max_epochs):
            model.train()
            losses = []
            for batch in epoch_batches(epoch):
                optimizer.zero_grad(set_to_none=True)
                loss = train_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{description}: loss became {loss.item()} at epoch {epoch}"
                    )
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            result.train_loss.extend(losses)
            current = float(val_loss())
            result.val_loss.append(current)
            first = current if first is None else first
            if current < best - 1e-6:
                best, stale, result.best_epoch = current, 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif best < first - 1e-6:
                # Patience runs only once the figure has moved: a detector's 1 - AP50 stays
                # at 1.0 for its first epochs on a few rare objects, which is no plateau.
                stale += 1
            info = {
                "epoch": float(epoch),
                "step": float(len(result.train_loss)),
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_loss": current,
            }
            log.debug("%s epoch %d: %s", description, epoch, info)
            if bar is not None and task is not None:
                bar.update(
                    task,
                    advance=1,
                    info=f"train {info['train_loss']:.4f} val {current:.4f}",
                )
            elif callable(progress):
                progress(info)
            report_epoch(epoch, current)
            if stale >= patience:
                break
    finally:
        if bar:
            bar.stop()
    model.load_state_dict(best_state)
    return result


def batched(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split an index array into consecutive batches of at most ``batch_size``."""
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
