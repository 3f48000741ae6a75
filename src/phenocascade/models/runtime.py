"""How a tier's model computes: eager fp32, bf16 autocast or ONNX Runtime, once checked.

A tier's ``runtime:`` in the topology names it:

* ``bf16`` runs the model under :func:`torch.autocast` (bfloat16 matrix products and
  convolutions; AMX or AVX-512 BF16 on CPUs that have it, tensor cores on CUDA) and keeps
  fp32 where autocast keeps it (softmax, losses) and every float64 computation;
* ``onnx`` runs the nucleus segmenter's U-Net (the bulk of the segmenting tiers' work) in
  ONNX Runtime on the CPU, in fp32: the network is exported once per loaded model, with
  batch, height and width dynamic; everything else stays in torch and numpy.

Either is served only for a model version whose check passed: its deciding metric on the
test split (AUROC, macro-F1 or AP50) changed by at most :data:`MAX_METRIC_CHANGE` from
eager. ``phenocascade check-runtime TIER --runtime R`` runs the check and records it in
the artifact's :data:`RUNTIME_CHECKS` file; a worker serves any other version eager and
says why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenocascade.config import Runtime
from phenocascade.domain import DecodedImage, StageOutput
from phenocascade.errors import ArtifactError, ConfigError
from phenocascade.models.segmentation import NucleusSegmenter

# The largest change of the deciding metric a runtime may cause (issue 13's bound).
MAX_METRIC_CHANGE = 0.005
RUNTIME_CHECKS = "runtimes.json"
# The ONNX operator set of the export (ONNX Runtime 1.20 and later run it).
ONNX_OPSET = 17
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeCheck:
    """A runtime's deciding metric on a split, beside eager's, for one model version.

    Attributes
    ----------
    runtime : str
        The runtime checked (not ``"eager"``).
    metric : str
        The deciding metric (``auroc``, ``macro_f1`` or ``ap50``).
    eager, value : float or None
        The metric under eager fp32 and under the runtime (``None``: not computable).
    split : str
        The split evaluated (``"test"``).
    images : int
        Its images.
    """

    runtime: str
    metric: str
    eager: float | None
    value: float | None
    split: str
    images: int

    @property
    def change(self) -> float | None:
        """The runtime's metric minus eager's, or ``None`` if either is missing."""
        if self.eager is None or self.value is None:
            return None
        return self.value - self.eager

    @property
    def accepted(self) -> bool:
        """Whether the metric changed by at most :data:`MAX_METRIC_CHANGE` either way."""
        return self.change is not None and abs(self.change) <= MAX_METRIC_CHANGE + 1e-12

    def describe(self) -> str:
        """One line: the two metrics, the change and the verdict."""
        change = "not computable" if self.change is None else f"{self.change:+.4f}"
        verdict = "accepted" if self.accepted else "refused"

        def shown(value: float | None) -> str:
            return "none" if value is None else f"{value:.4f}"

        return (
            f"{self.runtime} {self.metric} {shown(self.value)} against eager "
            f"{shown(self.eager)} on "
            f"{self.images} {self.split} images: change {change} (at most "
            f"{MAX_METRIC_CHANGE} allowed), {verdict}"
        )


def record_check(folder: Path, check: RuntimeCheck) -> None:
    """Record ``check`` in the artifact ``folder`` (replacing one of the same runtime)."""
    path = folder / RUNTIME_CHECKS
    checks = _read(path)
    checks[check.runtime] = {**dataclasses.asdict(check), "accepted": check.accepted}
    path.write_text(json.dumps(checks, indent=2) + "\n")


def read_check(folder: Path, runtime: str) -> RuntimeCheck | None:
    """Return the recorded check of ``runtime`` for the artifact ``folder``, if any."""
    record = _read(folder / RUNTIME_CHECKS).get(runtime)
    if record is None:
        return None
    fields = {f.name for f in dataclasses.fields(RuntimeCheck)}
    try:
        return RuntimeCheck(**{k: v for k, v in record.items() if k in fields})
    except TypeError as exc:
        raise ArtifactError(
            f"{folder / RUNTIME_CHECKS}: malformed {runtime} check ({exc})"
        ) from exc


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        checks = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable runtime check file ({exc})") from exc
    if not isinstance(checks, dict):
        raise ArtifactError(f"{path}: expected an object of runtime checks")
    return checks


class AutocastStage:
    """A :class:`~phenocascade.models.base.Stage` whose computations run under bf16 autocast.

    Every attribute is read from the wrapped stage; its methods (``predict`` with any
    options, and whatever else an evaluation calls, such as a detector's raw boxes) run
    under autocast.

    Parameters
    ----------
    stage : Stage
        The stage to run.
    device : str
        Its torch device (``"cpu"`` or ``"cuda"``, optionally with an index).
    """

    def __init__(self, stage: Any, device: str) -> None:
        self.stage = stage
        self.device_type = device.split(":")[0]

    def predict(self, images: Sequence[DecodedImage], **options: Any) -> list[StageOutput]:
        """Return the wrapped stage's outputs, computed under bf16 autocast."""
        with self._autocast():
            return list(self.stage.predict(images, **options))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("stage", "device_type"):
            raise AttributeError(name)
        found = getattr(self.stage, name)
        if not callable(found):
            return found

        @functools.wraps(found)
        def under_autocast(*args: Any, **kwargs: Any) -> Any:
            with self._autocast():
                return found(*args, **kwargs)

        return under_autocast


class OnnxNetwork:
    """A torch network whose calls run in ONNX Runtime; its other attributes are its own.

    The network is exported once (TorchScript exporter, opset :data:`ONNX_OPSET`, batch,
    height and width dynamic) and run by ONNX Runtime's CPU provider on ``threads``
    threads. Calling it takes and returns fp32 ``(N, C, H, W)`` tensors, as the network
    does; any other attribute (such as the segmenter's ``encoder_statistics``, read by
    shift detection) is the torch network's.

    Parameters
    ----------
    network : torch.nn.Module
        A network in eval mode, on the CPU, taking ``(N, channels, H, W)``.
    channels : int
        Its input channels.
    threads : int
        ONNX Runtime's intra-op threads (the worker's torch threads).
    """

    def __init__(self, network: torch.nn.Module, channels: int, threads: int) -> None:
        # Imported here: only a tier served in ONNX pays for it.
        import onnxruntime

        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            path = Path(scratch) / "network.onnx"
            # The TorchScript exporter warns that it is deprecated; its graph is exact here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (torch.zeros(1, channels, 64, 64),),
                path,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
                dynamo=False,
                opset_version=ONNX_OPSET,
            )
            graph = path.read_bytes()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.network = network
        self.session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's output for ``x``, computed by ONNX Runtime."""
        pixels = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["y"], {"x": pixels})[0])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("network", "session"):
            raise AttributeError(name)
        return getattr(self.network, name)


def in_onnx(stage: Any, device: str) -> Any:
    """Return ``stage`` with its nucleus segmenter's network run by :class:`OnnxNetwork`.

    The stage itself is changed (its ``segmenter_.network_``) and returned.

    Raises
    ------
    ConfigError
        If ``device`` is not the CPU, or the stage has no nucleus segmenter.
    """
    if device.split(":")[0] != "cpu":
        raise ConfigError(
            f"runtime onnx runs on the CPU (ONNX Runtime's CPU provider); on {device} use bf16"
        )
    segmenter = getattr(stage, "segmenter_", None)
    if not isinstance(segmenter, NucleusSegmenter):
        backend = getattr(stage, "model_name", type(stage).__name__)
        raise ConfigError(
            f"runtime onnx covers the models that segment nuclei (nucleus_mask_outlier_detector, "
            f"morphometric_classifier), not {backend}; serve it eager or bf16"
        )
    if not isinstance(segmenter.network_, OnnxNetwork):
        segmenter.network_ = OnnxNetwork(  # type: ignore[assignment]
            segmenter.network_, 3, torch.get_num_threads()
        )
    return stage


def with_runtime(stage: Any, runtime: Runtime, device: str) -> Any:
    """Return ``stage`` computing as ``runtime`` (unchecked: see :func:`serving`)."""
    if runtime == "eager":
        return stage
    if runtime == "onnx":
        return in_onnx(stage, device)
    return AutocastStage(stage, device)


def serving(
    stage: Any, folder: Path, runtime: Runtime, *, device: str, tier: str
) -> tuple[Any, Runtime]:
    """Return the stage a worker serves for a tier configured with ``runtime``, and its runtime.

    ``runtime`` is served only when the artifact ``folder`` records a passing check of it;
    otherwise the stage runs eager, and a warning names the tier and says why and what to
    run.
    """
    if runtime == "eager":
        return stage, "eager"
    check = read_check(folder, runtime)
    if check is not None and check.accepted:
        log.info("tier %s serves %s in %s (%s)", tier, folder.name, runtime, check.describe())
        return with_runtime(stage, runtime, device), runtime
    why = (
        check.describe()
        if check is not None
        else f"it is unchecked; run `phenocascade check-runtime {tier}`"
    )
    log.warning("tier %s serves %s eager, not %s: %s", tier, folder.name, runtime, why)
    return stage, "eager"
