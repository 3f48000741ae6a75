"""Image-level classifiers; the quality gate and the majority classifier share this.

Each label has a sigmoid output, except the labels of a softmax group: labels that exclude
each other and of which every training image holds exactly one (``nucleus_size:small``,
``:medium``, ``:large``) share one softmax, trained with cross-entropy, so their scores
compete and sum to 1.

Not a registered backend itself: :mod:`.quality_cnn` and :mod:`.multilabel_cnn` subclass it
with their kind and defaults.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812

from phenocascade.domain import DecodedImage, Sample, StageOutput, exclusive_groups
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._common import CalibratedStage
from phenocascade.models.calibration import SCORE_CLIP, logit, sigmoid
from phenocascade.models.nets import build_classifier
from phenocascade.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    grid_crops,
    normalize,
    random_crops,
    resize_square,
    to_chw,
    to_unit_rgb,
)
from phenocascade.models.training import (
    Loader,
    ProgressCallback,
    batched,
    fit_loop,
    seed_everything,
)

View = Literal["resize", "crops", "mixed"]


class GroupedClassifier(CalibratedStage):
    """Image labels scored from per-label logits: a softmax per exclusive group, else sigmoids.

    The base of the CNN classifiers (:class:`ImageClassifier`) and of the morphometric one
    (:mod:`.morphometric`): a subclass computes :meth:`decision_logits` and trains; this
    class finds the softmax groups, encodes targets, builds the loss, and turns logits into
    (calibrated) scores.

    Parameters
    ----------
    softmax_groups : sequence of sequence of str or None
        Labels that share one softmax. ``None`` finds them when fitting: each group of
        :func:`~phenocascade.domain.exclusive_groups` over the classes (declared by
        ``declared_groups``, else named ``G:V``) of which every training and early-stopping
        sample holds exactly one label; ``()`` keeps every label a sigmoid (artifacts from
        before softmax groups load so).
    declared_groups : mapping of str to sequence of str or None
        Exclusive groups the dataset declares (a tier's ``groups:``), for ``None`` above.
    """

    gate_label: str = "clear"

    def __init__(
        self,
        *,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        declared_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.softmax_groups = (
            None if softmax_groups is None else tuple(tuple(g) for g in softmax_groups)
        )
        self.declared_groups = {k: tuple(v) for k, v in (declared_groups or {}).items()}

    def _group_config(self) -> dict[str, Any]:
        """Return the group settings for :meth:`get_config`, left out when empty."""
        config: dict[str, Any] = {}
        if self.softmax_groups:
            config["softmax_groups"] = [list(g) for g in self.softmax_groups]
        if self.declared_groups:
            config["declared_groups"] = {k: list(v) for k, v in self.declared_groups.items()}
        return config

    @abstractmethod
    def decision_logits(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Uncalibrated logits, shape ``(len(images), len(classes))``, ``float64``."""

    # -- softmax groups ----------------------------------------------------------------------
    def _find_softmax_groups(self, samples: Sequence[Sample]) -> tuple[tuple[str, ...], ...]:
        """Return the exclusive groups of which every sample holds exactly one label."""
        if self.softmax_groups is not None:
            return self.softmax_groups
        candidates = dict.fromkeys(
            members
            for members in exclusive_groups(self.classes_, self.declared_groups).values()
            if len(members) > 1
        )
        return tuple(g for g in candidates if all(len(s.labels & set(g)) == 1 for s in samples))

    def _group_columns(self) -> list[list[int]]:
        """Return the column indices of each softmax group."""
        index = {c: i for i, c in enumerate(self.classes_)}
        return [[index[c] for c in g] for g in self.softmax_groups or ()]

    def _probabilities(self, logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Return the scores of ``(N, classes)`` logits: a softmax per group, else sigmoids."""
        probs = sigmoid(logits)
        for cols in self._group_columns():
            z = logits[:, cols] - logits[:, cols].max(axis=1, keepdims=True)
            e = np.exp(z)
            probs[:, cols] = e / e.sum(axis=1, keepdims=True)
        return probs

    def _encode(self, samples: Sequence[Sample]) -> torch.Tensor:
        target = torch.zeros(len(samples), len(self.classes_))
        index = {label: i for i, label in enumerate(self.classes_)}
        for row, sample in enumerate(samples):
            for label in sample.labels:
                if label not in index:
                    raise ConfigError(
                        f"sample {sample.image_id} has label {label!r}, not one of {self.classes_}"
                    )
                target[row, index[label]] = 1.0
        return target

    def _grouped_loss(
        self, pos_weight: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Return ``loss(logits, targets, weights)`` over ``(N, classes)`` tensors.

        Binary cross-entropy on the sigmoid labels (positives weighted by ``pos_weight``),
        cross-entropy on each softmax group; ``weights`` is 1 where a row is trained on a
        label.
        """
        group_cols = self._group_columns()
        sigmoid_cols = torch.ones(len(self.classes_), dtype=torch.bool)
        for cols in group_cols:
            sigmoid_cols[cols] = False

        def loss(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            total = F.binary_cross_entropy_with_logits(
                logits,
                y,
                weight=m * sigmoid_cols.to(m.device),
                pos_weight=pos_weight.to(logits.device),
            )
            for cols in group_cols:
                w = m[:, cols[0]]
                ce = F.cross_entropy(logits[:, cols], y[:, cols].argmax(1), reduction="none")
                total = total + (ce * w).sum() / w.sum().clamp(min=1.0)
            return total

        return loss

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Score a batch of images.

        Parameters
        ----------
        images : sequence of DecodedImage
            Pixels ``(H, W, C)``, ``uint8`` or ``uint16``, grey or RGB.
        calibrated : bool, default True
            Apply the fitted calibrators; ``False`` gives the raw sigmoid (and softmax)
            outputs.

        Returns
        -------
        list of StageOutput
            One per image, in order, with a score in ``[1e-6, 1 - 1e-6]`` for every class
            and no boxes.
        """
        logits = self.decision_logits(images)
        probs = np.clip(self._probabilities(logits), SCORE_CLIP, 1.0 - SCORE_CLIP)
        if calibrated:
            for j, c in enumerate(self.classes_):
                probs[:, j] = self.calibrators_[c](logit(probs[:, j]))
            probs = np.clip(probs, SCORE_CLIP, 1.0 - SCORE_CLIP)
        return [
            StageOutput(scores={c: float(p) for c, p in zip(self.classes_, row, strict=True)})
            for row in probs
        ]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ImageClassifier(GroupedClassifier):
    """A CNN with one sigmoid output per label, trained with (weighted) binary cross-entropy.

    Parameters
    ----------
    backbone : str
        ``"small_cnn"``, ``"resnet18"``, ``"resnet50"`` or ``"mobilenet_v2"``.
    input_size : int
        Side of the square network input in pixels.
    view : {"resize", "crops", "mixed"}
        ``"resize"`` squeezes the whole image to ``input_size`` (for whole-field labels);
        ``"crops"`` cuts ``input_size`` crops at native resolution and averages their logits
        (for texture such as focus, which resizing would destroy); ``"mixed"`` gives one
        network both: the labels of ``crop_groups`` are trained on and read from native
        crops (mean logit over the grid), every other label from the resized whole field.
    crop_groups : sequence of str
        ``view="mixed"`` only: label groups (the text before ``:`` in ``group:value``)
        read from native-resolution crops, e.g. an absolute size, which resizing hides.
    crops_per_image : int
        Random training crops cached per image (``view="crops"`` or ``"mixed"``).
    grid_per_side : int
        Inference crops per axis (``view="crops"`` or ``"mixed"``); up to
        ``grid_per_side**2`` crops.
    pretrained : str or None
        See :func:`phenocascade.models.nets.resolve_pretrained`.
    batch_size : int
        Training and inference batch size.
    lr : float
        AdamW learning rate.
    weight_decay : float
        AdamW weight decay.
    balance : bool
        Weight positives by ``n_negative / n_positive`` per label (clipped to ``[1, 50]``).
    softmax_groups, declared_groups
        See :class:`GroupedClassifier`.
    """

    def __init__(
        self,
        *,
        backbone: str,
        input_size: int,
        view: View,
        crop_groups: Sequence[str] = (),
        crops_per_image: int = 4,
        grid_per_side: int = 3,
        pretrained: str | None = None,
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        balance: bool = True,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        declared_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(softmax_groups=softmax_groups, declared_groups=declared_groups)
        self.backbone = backbone
        self.input_size = input_size
        self.view = view
        self.crop_groups = tuple(crop_groups)
        self.crops_per_image = crops_per_image
        self.grid_per_side = grid_per_side
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.balance = balance

    # -- configuration -------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact).

        ``crop_groups`` and the group settings are left out when empty: the gate's
        constructor has no such arguments.
        """
        config: dict[str, Any] = {
            "backbone": self.backbone,
            "input_size": self.input_size,
            "view": self.view,
            "crops_per_image": self.crops_per_image,
            "grid_per_side": self.grid_per_side,
            "pretrained": self.pretrained,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "balance": self.balance,
        }
        if self.crop_groups:
            config["crop_groups"] = list(self.crop_groups)
        return {**config, **self._group_config()}

    # -- views -----------------------------------------------------------------------------
    def _train_views(self, pixels: npt.NDArray[Any], rng: np.random.Generator) -> torch.Tensor:
        image = to_chw(to_unit_rgb(pixels))
        if self.view == "resize":
            return resize_square(image, self.input_size)[None]
        crops = random_crops(image, self.input_size, self.crops_per_image, rng)
        return crops if self.view == "crops" else self._field_then(image, crops)

    def _eval_views(self, pixels: npt.NDArray[Any]) -> torch.Tensor:
        image = to_chw(to_unit_rgb(pixels))
        if self.view == "resize":
            return resize_square(image, self.input_size)[None]
        crops = grid_crops(image, self.input_size, self.grid_per_side)
        return crops if self.view == "crops" else self._field_then(image, crops)

    def _field_then(self, image: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Return the ``"mixed"`` views: the resized field first, then the crops."""
        return torch.cat([resize_square(image, self.input_size)[None], crops])

    def _crop_labels(self) -> npt.NDArray[np.bool_]:
        """Which of ``classes_`` are read from crops; all for ``"crops"``, none for ``"resize"``."""
        if self.view != "mixed":
            return np.full(len(self.classes_), self.view == "crops")
        return np.array([c.partition(":")[0] in self.crop_groups for c in self.classes_])

    def _view_mask(self, n_views: int) -> torch.Tensor:
        """``(n_views, n_classes)`` loss weights: 1 where a view is trained on a label."""
        if self.view != "mixed":
            return torch.ones(n_views, len(self.classes_))
        from_crops = torch.from_numpy(self._crop_labels())
        return torch.cat([(~from_crops)[None], from_crops.expand(n_views - 1, -1)]).float()

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
        max_epochs: int = 10,
        patience: int = 3,
    ) -> Self:
        """Train on ``train`` with early stopping on the loss over ``val``.

        Parameters
        ----------
        train, val : sequence of Sample
            Labelled samples; ``Sample.labels`` holds the labels present.
        classes : sequence of str
            Output labels in order.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``; called once per sample.
        progress : bool, callable or None, default None
            See :func:`phenocascade.models.training.fit_loop`.
        seed : int, default 0
            Seeds weight init, crops, shuffling and augmentation.
        device : str, default "cpu"
            Torch device.
        max_epochs : int, default 10
            Upper bound on epochs.
        patience : int, default 3
            Epochs without validation improvement before stopping.

        Returns
        -------
        Self
            With ``net_``, ``classes_``, ``history_`` (training loss per step),
            ``val_history_``, ``calibrators_`` (temperature 1.0) and ``thresholds_`` (fallback).
        """
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        generator = seed_everything(seed)
        rng = np.random.default_rng(seed)
        self.classes_ = list(classes)
        if self.view == "mixed" and not self._crop_labels().any():
            raise ConfigError(
                f"view='mixed' reads crop_groups {list(self.crop_groups)} from crops, but no "
                f"class of {self.classes_} is in them; name a group such as 'nucleus_size'"
            )
        self.softmax_groups = self._find_softmax_groups([*train, *val])
        net = build_classifier(self.backbone, len(self.classes_), self.pretrained).to(device)

        def views(
            samples: Sequence[Sample], training: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xs, ys, masks = [], [], []
            targets = self._encode(samples)
            for sample, target in zip(samples, targets, strict=True):
                pixels = load(sample)
                v = self._train_views(pixels, rng) if training else self._eval_views(pixels)
                xs.append(v)
                ys.append(target.expand(len(v), -1))
                masks.append(self._view_mask(len(v)))
            return torch.cat(xs), torch.cat(ys), torch.cat(masks)

        x_train, y_train, m_train = views(train, True)
        x_val, y_val, m_val = views(val, False)
        positives = (y_train * m_train).sum(0)
        negatives = ((1.0 - y_train) * m_train).sum(0)
        if self.balance:
            pos_weight = (negatives / positives.clamp(min=1)).clamp(1.0, 50.0)
        else:
            pos_weight = torch.ones(len(self.classes_))
        pos_weight = pos_weight.to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def epoch_batches(_epoch: int) -> list[npt.NDArray[np.int64]]:
            return batched(rng.permutation(len(x_train)), self.batch_size)

        loss = self._grouped_loss(pos_weight)

        def train_step(idx: npt.NDArray[np.int64]) -> torch.Tensor:
            batch = augment_batch(x_train[idx], generator)
            logits = net(normalize(batch.to(device), IMAGENET_MEAN, IMAGENET_STD))
            return loss(logits, y_train[idx].to(device), m_train[idx].to(device))

        def val_loss() -> float:
            return float(loss(self._logits(net, x_val, device), y_val, m_val))

        result = fit_loop(
            net,
            optimizer=optimizer,
            epoch_batches=epoch_batches,
            train_step=train_step,
            val_loss=val_loss,
            max_epochs=max_epochs,
            patience=patience,
            progress=progress,
            description=f"{self.model_name}/{self.backbone}",
        )
        net.eval()
        self.net_ = net
        self.device_ = device
        self.history_ = result.train_loss
        self.val_history_ = result.val_loss
        self.best_epoch_ = result.best_epoch
        self._neutral_calibration()
        return self

    # -- inference -------------------------------------------------------------------------
    def _logits(self, net: torch.nn.Module, views: torch.Tensor, device: str) -> torch.Tensor:
        """Logits of ``(N, 3, S, S)`` unnormalised views, in batches; returned on the CPU."""
        net.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(views), self.batch_size):
                chunk = views[start : start + self.batch_size].to(device)
                out.append(net(normalize(chunk, IMAGENET_MEAN, IMAGENET_STD)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes_))

    def decision_logits(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Uncalibrated logits, shape ``(len(images), len(classes))``, ``float64``.

        With ``view="crops"`` an image's logit is the mean over its grid crops; with
        ``view="mixed"`` a label of ``crop_groups`` takes that mean and every other label
        the logit of the resized field.
        """
        per_image = [self._eval_views(img.pixels) for img in images]
        if not per_image:
            return np.zeros((0, len(self.classes_)))
        logits = self._logits(self.net_, torch.cat(per_image), self.device_).double().numpy()
        return pool_views(logits, [len(v) for v in per_image], self.view, self._crop_labels())

    def embed(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Global-average-pooled backbone features, shape ``(len(images), d)``, ``float64``.

        ``d`` is the input width of the network's last linear layer (64 for
        ``small_cnn``, 512 for ``resnet18``, 1280 for ``mobilenet_v2``). With
        ``view="crops"`` an image's features are the mean over its grid crops; with
        ``view="mixed"`` the mean of the field's features and that crop mean.
        """
        if not images:
            return np.zeros((0, self._head().in_features))
        views, counts = self._view_features(images)
        features = views.double().numpy()
        if self.view != "mixed":
            return _mean_per_image(features, counts)
        field = features[np.cumsum([0, *counts[:-1]])]
        crops = pool_views(features, counts, "mixed", np.ones(features.shape[1], dtype=bool))
        return (field + crops) / 2.0

    def _head(self) -> torch.nn.Linear:
        """Return the network's last linear layer (its head)."""
        return [m for m in self.net_.modules() if isinstance(m, torch.nn.Linear)][-1]

    def _view_features(self, images: Sequence[DecodedImage]) -> tuple[torch.Tensor, list[int]]:
        """Return the head's input for every view ``(views, d)``, and the views per image."""
        per_image = [self._eval_views(img.pixels) for img in images]
        captured: list[torch.Tensor] = []
        hook = self._head().register_forward_pre_hook(
            lambda _module, args: captured.append(args[0].detach().float().cpu())
        )
        try:
            self._logits(self.net_, torch.cat(per_image), self.device_)
        finally:
            hook.remove()
        return torch.cat(captured), [len(v) for v in per_image]

    def sample_probabilities(
        self, images: Sequence[DecodedImage], *, passes: int = 20, seed: int = 0
    ) -> npt.NDArray[np.float64]:
        """Monte-Carlo dropout: ``passes`` stochastic predictions of every image.

        The network's dropout before its last linear layer (MobileNetV2's classifier) stays
        on; as that is its only dropout, the backbone runs once per view and each pass
        redraws the dropout mask on the pooled features.

        Parameters
        ----------
        images : sequence of DecodedImage
            Pixels ``(H, W, C)``, ``uint8`` or ``uint16``.
        passes : int, default 20
            Samples per image.
        seed : int, default 0
            Seeds the dropout masks.

        Returns
        -------
        ndarray, shape (passes, len(images), len(classes)), float64
            Uncalibrated scores (a softmax per group, else sigmoids) of each pass.

        Raises
        ------
        ConfigError
            If the network has no dropout right before its last linear layer, or another.
        """
        dropout = self._head_dropout()
        head = self._head()
        if not images:
            return np.zeros((passes, 0, len(self.classes_)))
        features, counts = self._view_features(images)
        generator = torch.Generator().manual_seed(seed)
        weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
        out = []
        with torch.inference_mode():
            for _ in range(passes):
                keep = torch.rand(features.shape, generator=generator) >= dropout
                dropped = features * keep / (1.0 - dropout)
                logits = F.linear(dropped, weight, bias).double().numpy()
                pooled = pool_views(logits, counts, self.view, self._crop_labels())
                out.append(self._probabilities(pooled))
        return np.stack(out)

    def _head_dropout(self) -> float:
        """Return the drop rate of the network's one dropout layer, before its head."""
        layers = [m for m in self.net_.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        classifier = getattr(self.net_, "classifier", None)
        if (
            len(layers) != 1
            or not isinstance(classifier, torch.nn.Sequential)
            or classifier[0] is not layers[0]
            or not isinstance(classifier[-1], torch.nn.Linear)
        ):
            raise ConfigError(
                f"Monte-Carlo dropout needs one dropout layer right before the last linear "
                f"layer; the {self.backbone} network has {len(layers)} dropout layers "
                f"(mobilenet_v2 has one)"
            )
        return float(layers[0].p)

    # -- persistence -------------------------------------------------------------------------
    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.net_, self.input_size

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild a trained classifier from an artifact folder (``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        if stage.softmax_groups is None:
            stage.softmax_groups = ()  # saved before softmax groups, or none found
        # Pretrained weights only matter for initialisation; the artifact holds them all.
        net = build_classifier(stage.backbone, len(meta.classes))
        net.load_state_dict(artifact.load_weights(folder, device="cpu"))
        stage.net_ = net.to(device).eval()
        stage.device_ = device
        stage._adopt_meta(meta)
        return stage


def pool_views(
    rows: npt.NDArray[np.float64],
    counts: Sequence[int],
    view: View,
    from_crops: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]:
    """Pool each image's view rows into one row.

    Parameters
    ----------
    rows : numpy.ndarray
        ``(sum(counts), d)``, ``float64``: the rows of every image's views, image after
        image, in the order of :meth:`ImageClassifier._eval_views`.
    counts : sequence of int
        Views per image; under ``"mixed"`` the first is the resized field and at least one
        crop follows.
    view : {"resize", "crops", "mixed"}
        How the views were cut.
    from_crops : numpy.ndarray
        ``(d,)`` bool; under ``"mixed"``, the columns taken from the mean over the crops
        (the others come from the field row). Ignored otherwise.

    Returns
    -------
    numpy.ndarray
        ``(len(counts), d)``, ``float64``: ``"resize"`` and ``"crops"`` average all of an
        image's rows (one row under ``"resize"``).
    """
    if view != "mixed":
        return _mean_per_image(rows, counts)
    bounds = np.cumsum([0, *counts])
    pooled = [
        np.where(from_crops, rows[a + 1 : b].mean(0), rows[a])
        for a, b in itertools.pairwise(bounds)
    ]
    return np.stack(pooled)


def _mean_per_image(
    rows: npt.NDArray[np.float64], counts: Sequence[int]
) -> npt.NDArray[np.float64]:
    """Average consecutive runs of ``counts`` rows (an image's views): ``(len(counts), d)``."""
    bounds = np.cumsum([0, *counts])
    return np.stack([rows[a:b].mean(0) for a, b in itertools.pairwise(bounds)])
