"""One study's segmentation, in memory (`SegResult`) and on disk (`save_seg_result` / `load_seg_result`).

On disk a result is `<stem>.npz` (labels, instance numbers, voxels per slice) + `<stem>.json` (extents,
missing vertebrae, timing); the JSON is written last, so its presence means the study is done.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import VERTEBRAE
from ..io.files import write_npz_atomic, write_text_atomic
from .postprocess import VertebraExtent
from ..paths import PathLike


@dataclass
class SegResult:
    """One study's segmentation.

    Attributes:
        uid: StudyInstanceUID (None when unknown).
        labels: uint8 (Z, S, S) clean labels, 0 background, 1..7 = C1..C7, at the prepared in-plane size S.
            Slices are the study's slices, superior-first: index z here is index z of the sorted series
            (the cache never resamples z), so extents' slice indices are the original ones.
        extents: {"C1": VertebraExtent, ...} of the vertebrae found (in-plane boxes in the prepared scale).
        missing: C1..C7 names not found (including those dropped by the clean-up).
        dropped: {name: reason} removed by the clean-up (out of order, too small).
        timing: seconds per step (`prepare_s`, `forward_s`, `cleanup_s`, `total_s`) and `slices_per_s`.
        orig_hw: (H, W) of the original slices; `scale` maps prepared pixels to original ones.
        instance_numbers: (Z,) DICOM InstanceNumber of each slice, when known.
        spacing: (dz, dy, dx) mm in the prepared scale, when known.
        probs: uint8 (7, Z, S, S) ensemble probabilities in steps of 1/255 (`kit.stage1.infer.probs_to_float`), only with
            `keep_probs=True`.
    """

    uid: str | None
    labels: np.ndarray
    extents: dict[str, VertebraExtent]
    missing: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    orig_hw: tuple[int, int] | None = None
    instance_numbers: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per prepared pixel (1.0 when the original size is unknown)."""
        if self.orig_hw is None:
            return 1.0, 1.0
        return self.orig_hw[0] / self.labels.shape[1], self.orig_hw[1] / self.labels.shape[2]

    def table(self) -> pd.DataFrame:
        """One row per vertebra C1..C7: found, slice range, instance numbers, boxes in both scales."""
        return pd.DataFrame.from_dict(
            {name: _extent_record(self.extents.get(name), self.scale, self.instance_numbers)
             for name in VERTEBRAE}, orient="index")


def _extent_record(e: VertebraExtent | None, scale: tuple[float, float],
                   instance_numbers: np.ndarray | None) -> dict:
    """JSON-able description of one extent, with its box also in original pixels."""
    if e is None:
        return {"found": False}
    sy, sx = scale
    rec = {
        "found": True, "z_first": e.z_first, "z_last": e.z_last, "box": [e.y0, e.y1, e.x0, e.x1],
        "box_original": [math.floor(e.y0 * sy), math.ceil(e.y1 * sy), math.floor(e.x0 * sx), math.ceil(e.x1 * sx)],
        "voxels": e.voxels, "centroid": [round(c, 3) for c in e.centroid],
        "instance_numbers": None,
    }
    if instance_numbers is not None:
        numbers = np.asarray(instance_numbers)[e.z_first:e.z_last + 1]
        rec["instance_numbers"] = [int(numbers.min()), int(numbers.max())]
    return rec


def _stem(path: PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def save_seg_result(result: SegResult, path: PathLike) -> Path:
    """Save one study's result as `<path>.npz` (labels, instance numbers, voxels per slice) + `<path>.json`.

    The JSON is written last (atomically), so its presence means the study is done. It holds, per vertebra,
    the slice range (original slice indices, superior-first), the InstanceNumbers it spans, the in-plane box
    in the prepared scale (`box`: y0, y1, x0, x1, half-open) and in original pixels (`box_original`), with
    `scale` = original / prepared pixels.

    Args:
        result: from `segment_study`.
        path: file stem, e.g. `out/<uid>` (a `.npz` / `.json` suffix is dropped).

    Returns:
        The JSON path.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    z = result.labels.shape[0]
    arrays = {"labels": result.labels,
              "slice_voxels": np.stack([result.extents[n].slice_voxels if n in result.extents
                                        else np.zeros(z, np.int64) for n in VERTEBRAE])}
    if result.instance_numbers is not None:
        arrays["instance_numbers"] = np.asarray(result.instance_numbers)
    write_npz_atomic(stem.with_name(stem.name + ".npz"), arrays)
    info = {
        "uid": result.uid,
        "shape": list(result.labels.shape),
        "orig_hw": None if result.orig_hw is None else list(result.orig_hw),
        "scale": list(result.scale),
        "spacing": None if result.spacing is None else list(result.spacing),
        "missing": result.missing,
        "dropped": result.dropped,
        "timing": result.timing,
        "vertebrae": {n: _extent_record(result.extents.get(n), result.scale, result.instance_numbers)
                      for n in VERTEBRAE},
    }
    return write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps(info, indent=1))


def load_seg_result(path: PathLike) -> SegResult:
    """Read a result written by `save_seg_result` (`path`: the stem, or its `.npz` / `.json`)."""
    stem = _stem(path)
    json_path, npz_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz")
    if not json_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(f"no segmentation result at {stem}(.json, .npz)")
    info = json.loads(json_path.read_text())
    with np.load(npz_path) as data:
        labels, slice_voxels = data["labels"], data["slice_voxels"]
        numbers = data["instance_numbers"] if "instance_numbers" in data.files else None
    spacing = None if info["spacing"] is None else tuple(info["spacing"])
    extents = {}
    for i, name in enumerate(VERTEBRAE):
        rec = info["vertebrae"][name]
        if not rec["found"]:
            continue
        y0, y1, x0, x1 = rec["box"]
        extents[name] = VertebraExtent(name=name, label=i + 1, z_first=rec["z_first"], z_last=rec["z_last"],
                                       y0=y0, y1=y1, x0=x0, x1=x1, voxels=rec["voxels"],
                                       centroid=tuple(rec["centroid"]), slice_voxels=slice_voxels[i],
                                       spacing=spacing)
    return SegResult(uid=info["uid"], labels=labels, extents=extents, missing=info["missing"],
                     dropped=info["dropped"], timing=info["timing"],
                     orig_hw=None if info["orig_hw"] is None else tuple(info["orig_hw"]),
                     instance_numbers=numbers, spacing=spacing)
