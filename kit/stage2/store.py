"""The crop store: one `.npz` of a study's seven vertebra stacks, read whole or one vertebra at a time, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import N_VERTEBRAE
from ..io.files import NPZ_ERRORS

CROP_KEYS = ("crops", "found", "positions", "slice_targets", "instance_numbers", "spacing", "orig_hw")


# In the file, `crops` (7, T, C, S, S) is stored as one member per vertebra, `crops_0` .. `crops_6` (T, C, S, S):
# an npz member is one compressed stream, so a per-vertebra training sample then decompresses its own stack,
# not all seven (`load_vertebra_crops`). Files with a single `crops` member (before this layout) still load.
VERTEBRA_MEMBER = "crops_{}"


def crop_path(crop_dir, uid: str) -> Path:
    """`<crop_dir>/<uid>.npz`."""
    return Path(crop_dir) / f"{uid}.npz"


def crop_file_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The members a crop file stores for `arrays` (`CROP_KEYS`, ...): `crops` split into one member per vertebra."""
    out = {key: value for key, value in arrays.items() if key != "crops"}
    out.update({VERTEBRA_MEMBER.format(v): np.ascontiguousarray(stack) for v, stack in enumerate(arrays["crops"])})
    return out


def _corrupt(uid: str, path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"study {uid}: crop file {path} is corrupt ({type(exc).__name__}: {exc}); delete it and run "
                      "`kit crops` again")


def _open_crops(crop_dir, uid: str):
    """(path, open NpzFile) of a study's crop file; errors name the file and what to do."""
    path = crop_path(crop_dir, uid)
    if not path.is_file():
        raise FileNotFoundError(f"study {uid}: no crops at {path}; build them with `kit crops --config <cls config>`")
    try:
        return path, np.load(path)
    except NPZ_ERRORS as exc:
        raise _corrupt(uid, path, exc) from exc


def _read_members(path: Path, uid: str, data, keys: list[str]) -> dict[str, np.ndarray]:
    absent = [k for k in keys if k not in data.files]
    if absent:
        raise ValueError(f"study {uid}: crop file {path} lacks {absent} (has {sorted(data.files)}); delete it and "
                         "run `kit crops` again")
    try:
        return {key: data[key] for key in keys}
    except NPZ_ERRORS as exc:
        raise _corrupt(uid, path, exc) from exc


def _check_crop_shapes(path: Path, arrays: dict[str, np.ndarray], stack_shape: tuple) -> None:
    if len(stack_shape) != 4:
        raise ValueError(f"{path}: crops must be uint8 ({N_VERTEBRAE}, T, C, S, S); got a vertebra stack of shape "
                         f"{stack_shape}")
    t = stack_shape[0]
    for key, shape in (("found", (N_VERTEBRAE,)), ("positions", (N_VERTEBRAE, t)),
                       ("slice_targets", (N_VERTEBRAE, t))):
        if arrays[key].shape != shape:
            raise ValueError(f"{path}: {key} must have shape {shape} to match crops of {t} slices; "
                             f"got {arrays[key].shape}")
    arrays["found"] = arrays["found"].astype(bool)
    arrays["slice_targets"] = arrays["slice_targets"].astype(np.float32)


def load_vertebra_crops(crop_dir, uid: str, vertebra: int) -> dict[str, np.ndarray]:
    """One vertebra's stack of a study's cached crops, decompressing only that stack (and the small arrays).

    Returns:
        `crops` uint8 (T, C, S, S) of vertebra `vertebra` (0..6 = C1..C7) and the study's `found` bool (7,),
        `positions` int32 (7, T), `slice_targets` float32 (7, T) (NaN = unknown).

    Raises:
        FileNotFoundError, ValueError: as `load_crops`.
    """
    path, data = _open_crops(crop_dir, uid)
    with data:
        member = VERTEBRA_MEMBER.format(vertebra)
        split = member in data.files
        arrays = _read_members(path, uid, data, ["found", "positions", "slice_targets",
                                                 member if split else "crops"])
    crops = arrays.pop(member) if split else arrays.pop("crops")[vertebra]
    if crops.dtype != np.uint8:
        raise ValueError(f"{path}: crops must be uint8; got {crops.dtype}")
    _check_crop_shapes(path, arrays, crops.shape)
    return {"crops": crops, **arrays}


def load_crops(crop_dir, uid: str) -> dict[str, np.ndarray]:
    """One study's cached crops: `crops` uint8 (7, T, C, S, S), `found` bool (7,), `positions` int32 (7, T)
    (slice index in the series, -1 where not found), `slice_targets` float32 (7, T) (NaN = unknown),
    `instance_numbers`, `spacing`, `orig_hw` of the series.

    Raises:
        FileNotFoundError: no `<crop_dir>/<uid>.npz` (names the file; build it with `kit crops`).
        ValueError: the file is not a readable npz, lacks keys or its shapes disagree (names the file).
    """
    path, data = _open_crops(crop_dir, uid)
    with data:
        members = [VERTEBRA_MEMBER.format(v) for v in range(N_VERTEBRAE)]
        split = all(m in data.files for m in members)
        keys = [k for k in data.files if k not in members]
        if split and "crops" not in keys:
            keys = [*keys, *members]
        absent = [k for k in CROP_KEYS if k not in keys and not (k == "crops" and split)]
        if absent:
            raise ValueError(f"study {uid}: crop file {path} lacks {absent} (has {sorted(data.files)}); delete it "
                             "and run `kit crops` again")
        arrays = _read_members(path, uid, data, keys)
    if "crops" not in arrays:
        stacks = [arrays.pop(m) for m in members]
        if len({(s.shape, s.dtype) for s in stacks}) != 1:
            raise ValueError(f"{path}: the vertebrae's crops differ in shape or type: {[s.shape for s in stacks]}")
        arrays["crops"] = np.stack(stacks)
    crops = arrays["crops"]
    if crops.ndim != 5 or crops.shape[0] != N_VERTEBRAE or crops.dtype != np.uint8:
        raise ValueError(f"{path}: crops must be uint8 ({N_VERTEBRAE}, T, C, S, S); got {crops.dtype} {crops.shape}")
    _check_crop_shapes(path, arrays, crops.shape[1:])
    return arrays


def missing_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The vertebrae not found, one row each, from a crop cache's `manifest.csv` (`kit.stage2.crop_cache`).

    Args:
        manifest: its rows; `missing` holds "C3: reason; C7: reason" (empty when all seven were found).

    Returns:
        Columns `StudyInstanceUID, vertebra, reason, mask_source`, in manifest then C1..C7 order.
    """
    rows = []
    for record in manifest.itertuples(index=False):
        text = record.missing if isinstance(record.missing, str) else ""
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, _, reason = part.partition(":")
            rows.append({"StudyInstanceUID": record.StudyInstanceUID, "vertebra": name.strip(),
                         "reason": reason.strip(), "mask_source": record.mask_source})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "vertebra", "reason", "mask_source"])
