"""Small OME-Zarr images written for tests (unit and integration), as a scanner writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr


def write_ome_zarr(path: Path, planes: np.ndarray, axes: str, *, version: str) -> Path:
    """Write ``planes`` and its 2x and 4x reductions (of y and x) as an OME-Zarr image.

    ``version`` ``"0.5"`` writes Zarr v3 with the metadata under ``ome``; ``"0.4"`` writes
    Zarr v2 with it at the top of the attributes.
    """
    group = zarr.open_group(path, mode="w", zarr_format=3 if version == "0.5" else 2)
    datasets = []
    for level, step in enumerate((1, 2, 4)):
        data = planes[..., ::step, ::step]
        chunks = tuple(1 if a not in "yx" else 128 for a in axes)
        group.create_array(str(level), shape=data.shape, chunks=chunks, dtype=data.dtype)[:] = data
        scale = [1.0 if a not in "yx" else float(step) for a in axes]
        transform = {"type": "scale", "scale": scale}
        datasets.append({"path": str(level), "coordinateTransformations": [transform]})
    kinds = {"c": "channel", "z": "space", "t": "time", "y": "space", "x": "space"}
    multiscales: list[dict[str, Any]] = [
        {"axes": [{"name": a, "type": kinds[a]} for a in axes], "datasets": datasets}
    ]
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = [{**multiscales[0], "version": "0.4"}]
    return path
