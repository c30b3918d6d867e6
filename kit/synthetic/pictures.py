"""The gallery of ``docs/synthetic.md``: each fracture kind and each look-alike beside the same seed without it.

Redraw with ``python -m kit.synthetic.pictures docs/synthetic`` (about 20 s on two cores). matplotlib is
imported only here, when the pictures are drawn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..constants import WINDOWS
from .anatomy import LEVEL_LABELS
from .fractures import FRACTURE_KINDS, LOOKALIKE_KINDS
from .study import SyntheticStudy, make_study

#: One seed for the whole gallery, so every picture shows the same neck.
GALLERY_SEED = 21
GALLERY_SIZE = 256
FRACTURE_VERTEBRA = {"hairline": "C5", "cleft": "C5", "displaced": "C5", "compression": "C5"}
LOOKALIKE_VERTEBRA = {"vascular_channel": "C5", "osteophyte": "C5", "endplate_sclerosis": "C5",
                      "healed_fracture": "C5", "metal_implant": "C4"}


def _window(hu: np.ndarray) -> np.ndarray:
    center, width = WINDOWS["bone"]
    return np.clip((hu.astype(np.float32) - (center - width / 2)) / width, 0, 1)


def _crop(study: SyntheticStudy, z: int, row: float, col: float, half_mm: float = 32.0):
    half = int(round(half_mm / study.spacing[1]))
    r0 = int(np.clip(round(row) - half, 0, study.hu.shape[1] - 2 * half))
    c0 = int(np.clip(round(col) - half, 0, study.hu.shape[2] - 2 * half))
    return _window(study.hu[z, r0:r0 + 2 * half, c0:c0 + 2 * half]), (r0, c0)


def _centre(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


def _pair_figure(path: Path, title: str, left, right, left_title: str, right_title: str, boxes=()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=100)
    for ax, image, name in zip(axes, (left, right), (left_title, right_title)):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for x, y, w, h in boxes:
        axes[1].add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="#ffb000", lw=1.0, ls="--"))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_fracture(kind: str, out_dir: Path, seed: int = GALLERY_SEED, size: int = GALLERY_SIZE) -> Path:
    """The axial slice where a ``kind`` fracture changes most voxels, with and without it (its box dashed)."""
    vertebra = FRACTURE_VERTEBRA[kind]
    common = dict(size=size, lookalikes=[], noise_hu=None)
    intact = make_study(seed, fractures={}, **common)
    broken = make_study(seed, fractures={vertebra: 1}, fracture_kinds={vertebra: kind}, **common)
    delta = np.abs(broken.hu.astype(np.int32) - intact.hu.astype(np.int32))
    box = max(broken.boxes, key=lambda b: delta[b["slice_index"], int(b["y"]):int(b["y"] + b["height"]),
                                                   int(b["x"]):int(b["x"] + b["width"])].sum())
    site = broken.fracture_sites[0]
    if kind == "compression":  # a wedge shows side-on
        left, right = _sagittal_pair(intact, broken, LEVEL_LABELS[vertebra])
        title = f"{kind} fracture of {vertebra} ({site['site']}, {site['subtlety']}): sagittal through its midline"
        return _pair_figure(out_dir / f"fracture_{kind}.png", title, left, right, "same seed, intact", kind)
    z = box["slice_index"]
    row, col = _centre(broken.labels[z] == LEVEL_LABELS[vertebra])
    left, _ = _crop(intact, z, row, col)
    right, (r0, c0) = _crop(broken, z, row, col)
    title = f"{kind} fracture of {vertebra} ({site['site']}, {site['subtlety']}): slice {z}"
    boxes = [(b["x"] - c0, b["y"] - r0, b["width"], b["height"]) for b in broken.boxes if b["slice_index"] == z]
    return _pair_figure(out_dir / f"fracture_{kind}.png", title, left, right, "same seed, intact", kind, boxes)


def _sagittal(study: SyntheticStudy, col: int, n_slices: int | None = None) -> np.ndarray:
    """A sagittal reformat through column ``col`` (rows = slices resampled to square pixels), bone window;
    padded with black below the last slice up to ``n_slices``."""
    n = n_slices or study.n_slices
    zoom = study.spacing[0] / study.spacing[1]
    rows = np.round(np.arange(int(n * zoom)) / zoom).astype(int)
    image = np.zeros((len(rows), study.hu.shape[1]), np.float32)
    inside = rows < study.n_slices
    image[inside] = _window(study.hu[rows[inside], :, col])
    return image


def _sagittal_pair(left: SyntheticStudy, right: SyntheticStudy, level: int, half_mm: float = 40.0):
    """Sagittal crops of two studies of one seed through the midline of ``level``, centred on it."""
    z, r, c = np.nonzero(left.labels == level)
    col = int(np.median(c))
    zoom = left.spacing[0] / left.spacing[1]
    centre = (float(np.median(z)) * zoom, float(np.median(r)))
    half = int(round(half_mm / left.spacing[1]))
    images = [_sagittal(s, col, left.n_slices) for s in (left, right)]
    r0 = int(np.clip(round(centre[0]) - half, 0, images[0].shape[0] - 2 * half))
    c0 = int(np.clip(round(centre[1]) - half, 0, images[0].shape[1] - 2 * half))
    return [im[r0:r0 + 2 * half, c0:c0 + 2 * half] for im in images]


def draw_lookalike(kind: str, out_dir: Path, seed: int = GALLERY_SEED, size: int = GALLERY_SIZE) -> Path:
    """A look-alike beside the same seed without it: an axial slice through it, or a sagittal reformat for a
    scan that stops in C7."""
    vertebra = LOOKALIKE_VERTEBRA.get(kind)
    forced = {kind: vertebra}
    plain = make_study(seed, fractures={}, size=size, lookalikes=[])
    look = make_study(seed, fractures={}, size=size, lookalikes=forced)
    (record,) = look.lookalikes
    title = f"{kind.replace('_', ' ')} ({record['vertebra']}{', ' + record['site'] if record['site'] else ''})"
    if kind in ("truncated_c7", "osteophyte"):  # both show side-on
        left, right = _sagittal_pair(plain, look, LEVEL_LABELS[record["vertebra"]])
        right_title = "stops in C7 (label unchanged)" if kind == "truncated_c7" else "with the look-alike"
        return _pair_figure(out_dir / f"lookalike_{kind}.png", title + ": sagittal", left, right,
                            "same seed, without", right_title)
    if kind == "osteopenia":
        level = LEVEL_LABELS["C5"]
        z = int(np.median(np.nonzero((look.labels == level).any(axis=(1, 2)))[0]))
    else:
        level = LEVEL_LABELS[record["vertebra"]]
        delta = np.abs(look.hu.astype(np.int32) - plain.hu.astype(np.int32))
        z = int(np.argmax((delta > 100).sum(axis=(1, 2))))
    mask = look.labels[z] == level
    row, col = _centre(mask if mask.any() else look.labels[z] > 0)
    left, _ = _crop(plain, z, row, col)
    right, _ = _crop(look, z, row, col)
    return _pair_figure(out_dir / f"lookalike_{kind}.png", f"{title}: slice {z}", left, right,
                        "same seed, without", "with the look-alike (not a fracture)")


def draw_gallery(out_dir: str | os.PathLike) -> list[Path]:
    """Draw every fracture kind and every look-alike into ``out_dir`` (PNG files, returned)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [draw_fracture(kind, out) for kind in FRACTURE_KINDS]
    paths += [draw_lookalike(kind, out) for kind in LOOKALIKE_KINDS]
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="draw the synthetic fracture / look-alike gallery")
    parser.add_argument("out_dir", nargs="?", default="docs/synthetic")
    for path in draw_gallery(parser.parse_args(argv).out_dir):
        print(path)


if __name__ == "__main__":
    main()
