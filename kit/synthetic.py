"""RSNA-format synthetic cervical-spine CT: studies, DICOM series, segmentations and whole datasets.

Everything here is deterministic by seed and built from analytic shapes with numpy broadcasting, so the
kit's tests and demo can run the real pipeline without the competition data:

* :func:`make_study` builds one axial CT volume in HU (index 0 = most superior slice) with its ground truth:
  a per-voxel vertebra label map (1..7 = C1..C7, 8 = T1, 9 = T2), per-vertebra fracture labels and the
  per-slice fracture boxes.
* :func:`write_study` writes it as one ``<InstanceNumber>.dcm`` CT file per slice, in any of
  :data:`TRANSFER_SYNTAXES` (including JPEG Lossless SV1, which pydicom cannot encode: a small numpy
  encoder lives here), head-first or feet-first, with the header variations seen in the competition.
* :func:`write_segmentation` writes the label map as a NIfTI file stored the way RSNA's are, with an
  affine consistent with the DICOM geometry.
* :func:`make_dataset` writes the whole competition layout (CSV tables, ``train_images``, ``test_images``,
  ``segmentations``) in parallel.

Anatomy (mm, HU): C1 ring with lateral masses and transverse foramina, C2 with the dens rising into the
ring, C3–C7 with bodies, pedicles, articular pillars (oblique facet joints), laminae and bifid spinous
processes, C7's long spinous process, T1–T2 with rib heads, discs, spinal canal and cord; occiput,
mandible, hyoid, airway, thyroid, lung apices, clavicles, neck soft tissue and an optional table. Each
study varies size, lordosis, rotation, position, field of view, slice spacing and bone density.

numpy / pandas / pydicom / nibabel / scipy only: never imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from .constants import SEG_LABELS, THORACIC_LABELS, TRAIN_PREVALENCE, UID_PREFIX, VERTEBRAE, WINDOWS

log = logging.getLogger(__name__)

__all__ = [
    "HU_RANGE",
    "LEVELS",
    "LEVEL_LABELS",
    "PREDICTION_TYPES",
    "TRANSFER_SYNTAXES",
    "SyntheticStudy",
    "encode_jpeg_lossless",
    "make_dataset",
    "make_study",
    "sample_fractures",
    "write_segmentation",
    "write_study",
]

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

#: Every HU value the generator produces lies in this range, which every exact header combination of
#: :func:`write_study` represents (12-bit unsigned with intercept -1024 goes up to 3071, 12-bit signed with
#: intercept 0 up to 2047).
HU_RANGE = (-1024, 2047)

#: Levels the generator builds, head to feet, and their label values in the segmentation volume.
LEVELS = (*VERTEBRAE, "T1", "T2")
LEVEL_LABELS = {**SEG_LABELS, "T1": THORACIC_LABELS["T1"], "T2": THORACIC_LABELS["T2"]}

#: prediction_type order of the rows of one study in test.csv / sample_submission.csv.
PREDICTION_TYPES = (*VERTEBRAE, "patient_overall")

#: The public test.csv lists these three studies, which have no folder in the public test_images/.
PUBLIC_TEST_CSV_UIDS = (UID_PREFIX + "10197", UID_PREFIX + "10454", UID_PREFIX + "10690")


def _transfer_syntaxes() -> dict[str, Any]:
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLosslessSV1,
        RLELossless,
    )

    syntaxes = {
        "explicit": ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "jpeg-lossless": JPEGLosslessSV1,
        "rle": RLELossless,
        "big-endian": ExplicitVRBigEndian,
    }
    try:
        from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder

        if JPEG2000LosslessEncoder.is_available:
            syntaxes["jpeg2000"] = JPEG2000Lossless
        if JPEGLSLosslessEncoder.is_available:
            from pydicom.uid import JPEGLSLossless

            syntaxes["jpeg-ls"] = JPEGLSLossless
    except ImportError:  # pragma: no cover - pydicom < 3
        pass
    return syntaxes


#: name -> transfer syntax UID for :func:`write_study`. "jpeg-lossless" is JPEG Lossless, Non-Hierarchical,
#: First-Order Prediction (Process 14, Selection Value 1), 1.2.840.10008.1.2.4.70, as in the competition.
#: "jpeg2000" / "jpeg-ls" appear only where pydicom has an encoder for them.
TRANSFER_SYNTAXES = _transfer_syntaxes()

#: Transfer syntaxes a dataset cycles through (the ones seen in the competition, plus RLE).
DATASET_TRANSFER_SYNTAXES = ("implicit", "jpeg-lossless", "explicit", "rle")

#: (RescaleIntercept, signed, BitsStored) combinations that represent HU_RANGE exactly.
EXACT_ENCODINGS = ((-1024, False, 12), (-1024, True, 16), (0, True, 12), (-1024, False, 16), (0, True, 16))

# Fractured vertebrae per study in the 2019 training studies (RSNA_DATA.md).
_FRACTURE_COUNTS = {0: 1058, 1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Per-level shape (mm, before the per-study scale): body width (left-right), body depth (AP), body height,
# disc above, canal width, canal depth, spinous process length, spinous slope (mm caudal per mm posterior),
# bifid spinous process, transverse process reach from the midline, transverse foramen.
_DIMS = {
    "C2": dict(bw=18.0, bd=15.5, bh=21.0, disc=0.0, cw=25.5, cd=16.0, sl=17.0, ss=0.45, bifid=True, tpr=23.0,
               foramen=True),
    "C3": dict(bw=18.0, bd=15.5, bh=13.0, disc=5.0, cw=25.0, cd=15.0, sl=11.0, ss=0.50, bifid=True, tpr=25.0,
               foramen=True),
    "C4": dict(bw=19.0, bd=16.0, bh=13.0, disc=5.0, cw=25.0, cd=14.5, sl=12.0, ss=0.55, bifid=True, tpr=26.0,
               foramen=True),
    "C5": dict(bw=20.0, bd=16.5, bh=13.0, disc=5.0, cw=25.0, cd=14.5, sl=13.5, ss=0.60, bifid=True, tpr=27.0,
               foramen=True),
    "C6": dict(bw=22.0, bd=17.0, bh=13.5, disc=5.0, cw=25.0, cd=14.5, sl=16.0, ss=0.70, bifid=True, tpr=28.0,
               foramen=True),
    "C7": dict(bw=24.0, bd=17.5, bh=14.0, disc=5.0, cw=24.0, cd=14.5, sl=25.0, ss=0.80, bifid=False, tpr=31.0,
               foramen=False),
    "T1": dict(bw=27.0, bd=18.0, bh=16.0, disc=4.5, cw=21.0, cd=14.0, sl=27.0, ss=1.00, bifid=False, tpr=37.0,
               foramen=False),
    "T2": dict(bw=28.0, bd=19.0, bh=17.0, disc=4.5, cw=18.5, cd=14.0, sl=28.0, ss=1.10, bifid=False, tpr=37.0,
               foramen=False),
}


# ---------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticStudy:
    """One synthetic axial CT study with its ground truth.

    Geometry: slice ``k`` of ``hu`` is the axial plane at LPS z = ``origin[2] - k * spacing[0]`` (index 0 is the
    most superior slice); pixel ``(row, col)`` of any slice lies at LPS
    ``(origin[0] + col * dx, origin[1] + row * dy)`` (ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``).

    Attributes:
        uid: StudyInstanceUID, starts with ``UID_PREFIX``.
        hu: (Z, H, W) int16 Hounsfield units, within :data:`HU_RANGE`.
        labels: (Z, H, W) uint8 vertebra labels (0 background, 1..7 = C1..C7, 8 = T1, 9 = T2).
        fractures: C1..C7 -> 0/1.
        boxes: one dict per slice that shows a fracture: x, y, width, height (pixels of that slice),
            slice_index (0-based index into ``hu``), vertebra.
        spacing: (dz, dy, dx) in mm; dy = PixelSpacing[0] (between rows), dx = PixelSpacing[1].
        origin: LPS (x, y, z) mm of voxel (0, 0, 0), the ImagePositionPatient of the most superior slice.
        orientation: ImageOrientationPatient (row direction, column direction).
        seed: the seed it was made from.
        fracture_sites: one dict per fracture cleft: vertebra, kind ("body", "arch", "dens"), slices.
        meta: the drawn anatomy parameters (scale, lordosis, field of view ...), JSON-serialisable.
    """

    uid: str
    hu: np.ndarray
    labels: np.ndarray
    fractures: dict[str, int]
    boxes: list[dict]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    seed: int = 0
    fracture_sites: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def patient_overall(self) -> int:
        return int(any(self.fractures.values()))

    def slice_z(self) -> np.ndarray:
        """(Z,) LPS z (mm) of each slice of ``hu``, decreasing (index 0 = most superior)."""
        return np.round(self.origin[2] - self.spacing[0] * np.arange(self.n_slices), 6)

    def position(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index`` of ``hu``."""
        return (self.origin[0], self.origin[1], float(round(self.origin[2] - self.spacing[0] * index, 6)))

    def instance_numbers(self, head_first: bool = True) -> np.ndarray:
        """(Z,) InstanceNumber of each slice of ``hu`` as :func:`write_study` numbers them."""
        z = self.n_slices
        return np.arange(1, z + 1) if head_first else np.arange(z, 0, -1)

    def label_row(self) -> dict[str, Any]:
        """This study's train.csv row."""
        return {"StudyInstanceUID": self.uid, "patient_overall": self.patient_overall,
                **{v: int(self.fractures[v]) for v in VERTEBRAE}}


# ---------------------------------------------------------------------------------------------------------
# Fracture labels
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _subset_model() -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Fracture-count distribution and, per count, the subsets with probabilities whose marginals match.

    Model: draw the number of fractured vertebrae k from the real distribution, then a k-subset of C1..C7 with
    probability proportional to prod(w_i) over its members; w is fitted so every vertebra's marginal
    prevalence equals TRAIN_PREVALENCE (the real counts give sum(prevalence) == E[k], so this is exact).
    """
    counts = np.array([_FRACTURE_COUNTS.get(k, 0) for k in range(8)], float)
    p_k = counts / counts.sum()
    target = np.array(TRAIN_PREVALENCE[1:], float)
    subsets = {k: np.array(list(combinations(range(7), k)), dtype=np.int64) for k in range(1, 8)}
    w = target.copy()
    for _ in range(500):
        marg = np.zeros(7)
        for k in range(1, 8):
            if p_k[k] == 0:
                continue
            sub = subsets[k]
            weights = np.prod(w[sub], axis=1)
            probs = weights / weights.sum()
            for j in range(k):
                marg += p_k[k] * np.bincount(sub[:, j], weights=probs, minlength=7)
        if np.max(np.abs(marg - target)) < 1e-9:
            break
        w *= (target / marg) ** 0.7
    tables = {}
    for k in range(1, 8):
        sub = subsets[k]
        weights = np.prod(w[sub], axis=1)
        tables[k] = (sub, weights / weights.sum())
    return p_k, tables


def sample_fractures(rng: np.random.Generator) -> dict[str, int]:
    """Draw C1..C7 fracture labels with the competition's statistics.

    The number of fractured vertebrae follows the real training distribution (0: 52 %, 1: 31 %, 2: 12 % ...),
    and each vertebra's marginal prevalence equals ``TRAIN_PREVALENCE`` (C1 0.072 ... C7 0.195); so
    patient_overall is positive with probability 0.476.
    """
    p_k, tables = _subset_model()
    k = int(rng.choice(len(p_k), p=p_k))
    labels = dict.fromkeys(VERTEBRAE, 0)
    if k:
        sub, probs = tables[k]
        for i in sub[rng.choice(len(sub), p=probs)]:
            labels[VERTEBRAE[i]] = 1
    return labels


# ---------------------------------------------------------------------------------------------------------
# Volume geometry and shape primitives
# ---------------------------------------------------------------------------------------------------------


class _Part:
    """One solid piece: an in-plane shape swept over a local z range (mm, caudal positive).

    kind "ell": superellipse centred (cu, cv), radii (ru, rv), exponent p.
    kind "cap": capsule around the segment (u0, v0)-(u1, v1), radius r.
    kind "ring": elliptical annulus centred (cu, cv), inner radii (riu, riv), outer (ru, rv); only u in
    [umin, umax].
    The z range [w0, w1] moves by ``slope * (u - uref)`` (posterior parts sloping caudally); ``q`` rounds
    its ends (in-plane size shrinks as sqrt(1 - |t|^q) with t the normalised z position; None = flat).
    """

    __slots__ = ("kind", "g", "w0", "w1", "slope", "uref", "q", "neg")

    def __init__(self, kind, g, w0, w1, slope=0.0, uref=0.0, q=None, neg=False):
        self.kind, self.g, self.w0, self.w1 = kind, g, float(w0), float(w1)
        self.slope, self.uref, self.q, self.neg = float(slope), float(uref), q, neg

    def bounds(self) -> tuple[float, float, float]:
        """In-plane bounding circle (cu, cv, R)."""
        g = self.g
        if self.kind == "cap":
            (u0, v0), (u1, v1), r = g["a"], g["b"], g["r"]
            return (u0 + u1) / 2, (v0 + v1) / 2, math.hypot(u1 - u0, v1 - v0) / 2 + r
        return g["c"][0], g["c"][1], max(g["r"][0], g["r"][1])

    def mask(self, u, v, w) -> np.ndarray:
        g = self.g
        half = (self.w1 - self.w0) / 2
        t = (w - (self.w0 + half) - self.slope * (u - self.uref)) / half
        if self.q is None:
            lim = (np.abs(t) <= 1).astype(np.float32)
        else:
            lim = np.sqrt(np.clip(1 - np.abs(t) ** self.q, 0, None))
        if self.kind == "cap":
            (u0, v0), (u1, v1), r = g["a"], g["b"], g["r"]
            du, dv = u1 - u0, v1 - v0
            ll = du * du + dv * dv
            s = np.clip(((u - u0) * du + (v - v0) * dv) / ll, 0, 1) if ll > 0 else 0.0
            d2 = (u - u0 - s * du) ** 2 + (v - v0 - s * dv) ** 2
            return d2 <= (r * lim) ** 2
        (cu, cv), (ru, rv) = g["c"], g["r"]
        p = g.get("p", 2.0)
        if p == 2.0:
            rho = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
            inside = rho <= lim**2
        else:
            rho = np.abs((u - cu) / ru) ** p + np.abs((v - cv) / rv) ** p
            inside = rho <= lim**p
        if self.kind == "ring":
            riu, riv = g["ri"]
            inside &= ((u - cu) / riu) ** 2 + ((v - cv) / riv) ** 2 > 1
            inside &= (u >= g.get("umin", -np.inf)) & (u <= g.get("umax", np.inf))
        return inside


def _ell(c, r, w0, w1, p=2.0, **kw) -> _Part:
    return _Part("ell", {"c": c, "r": r, "p": p}, w0, w1, **kw)


def _cap(a, b, r, w0, w1, **kw) -> _Part:
    return _Part("cap", {"a": a, "b": b, "r": r}, w0, w1, **kw)


def _ring(c, ri, ro, w0, w1, umin=-np.inf, umax=np.inf, **kw) -> _Part:
    return _Part("ring", {"c": c, "ri": ri, "r": ro, "umin": umin, "umax": umax}, w0, w1, **kw)


def _mirror(make) -> list[_Part]:
    """Both sides of a bilateral part: ``make(side)`` with side = +1 (patient left) and -1."""
    return [make(1.0), make(-1.0)]


class _Grid:
    """The volume's sampling and the spine's path: per-slice column centre and axial rotation."""

    def __init__(self, shape, spacing, s0, yc, xc, theta):
        self.Z, self.H, self.W = shape
        self.dz, self.dy, self.dx = spacing
        self.s = (s0 + self.dz * np.arange(self.Z)).astype(np.float64)  # mm along the column, caudal +
        self.y = (np.arange(self.H) * self.dy).astype(np.float32)
        self.x = (np.arange(self.W) * self.dx).astype(np.float32)
        self.yc, self.xc = yc.astype(np.float32), xc.astype(np.float32)
        self.cos = np.cos(theta).astype(np.float32)
        self.sin = np.sin(theta).astype(np.float32)

    def zslice(self, s_lo: float, s_hi: float) -> slice:
        a = int(np.searchsorted(self.s, s_lo, side="left"))
        b = int(np.searchsorted(self.s, s_hi, side="right"))
        return slice(max(a, 0), min(b, self.Z))

    def local(self, zs: slice, rs: slice, cs: slice, top: float = 0.0, tilt: float = 0.0):
        """Local (u: posterior +, v: patient left +, w: caudal + from ``top``) mm coordinates of a box."""
        dY = self.y[rs][None, :, None] - self.yc[zs][:, None, None]
        dX = self.x[cs][None, None, :] - self.xc[zs][:, None, None]
        c, s = self.cos[zs][:, None, None], self.sin[zs][:, None, None]
        u = c * dY + s * dX
        v = c * dX - s * dY
        w = (self.s[zs][:, None, None].astype(np.float32) - np.float32(top)) + np.float32(tilt) * u
        return u, v, w

    def box(self, s_lo, s_hi, cu, cv, R) -> tuple[slice, slice, slice] | None:
        """Index box covering an in-plane circle (local centre cu, cv; radius R) over s in [s_lo, s_hi]."""
        zs = self.zslice(s_lo, s_hi)
        if zs.stop <= zs.start:
            return None
        c, s = self.cos[zs], self.sin[zs]
        yy = self.yc[zs] + c * cu - s * cv
        xx = self.xc[zs] + s * cu + c * cv
        r0 = max(int(math.floor((yy.min() - R) / self.dy)), 0)
        r1 = min(int(math.ceil((yy.max() + R) / self.dy)) + 1, self.H)
        c0 = max(int(math.floor((xx.min() - R) / self.dx)), 0)
        c1 = min(int(math.ceil((xx.max() + R) / self.dx)) + 1, self.W)
        if r1 <= r0 or c1 <= c0:
            return None
        return zs, slice(r0, r1), slice(c0, c1)


def _union(boxes):
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def _sub(inner, outer):
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


@dataclass
class _Fracture:
    """A cleft in a vertebra's local frame: plane n.(p - p0) = 0, a gap of ``gap`` mm, within ``radius`` of
    the in-plane point and w in [wa, wb]; the positive side may be shifted by (du, dv) mm."""

    kind: str
    pu: float
    pv: float
    pw: float
    n: tuple[float, float, float]
    gap: float
    wa: float
    wb: float
    radius: float
    du: float = 0.0
    dv: float = 0.0

    def signed(self, u, v, w):
        return self.n[0] * (u - self.pu) + self.n[1] * (v - self.pv) + self.n[2] * (w - self.pw)

    def region(self, u, v, w):
        return ((w >= self.wa) & (w <= self.wb)
                & ((u - self.pu) ** 2 + (v - self.pv) ** 2 <= self.radius**2))


def _solid(grid: _Grid, parts: list[_Part], top: float, tilt: float, fractures=()):
    """Boolean solid of ``parts`` in its index box, with fragment displacement; plus each cleft's gap mask."""
    info = []
    for part in parts:
        cu, cv, R = part.bounds()
        uu = np.array([cu - R, cu + R])
        ws = np.concatenate([part.w0 + part.slope * (uu - part.uref), part.w1 + part.slope * (uu - part.uref)])
        s_lo = top + ws.min() - abs(tilt) * (abs(cu) + R) - 0.01
        s_hi = top + ws.max() + abs(tilt) * (abs(cu) + R) + 0.01
        info.append((part, grid.box(s_lo, s_hi, cu, cv, R + max(grid.dy, grid.dx))))
    outer = _union(b for p, b in info if not p.neg)
    if outer is None:
        return None, None, [None] * len(fractures)
    solid = np.zeros(tuple(s.stop - s.start for s in outer), bool)
    shifted = [f for f in fractures if f.du or f.dv]
    for part, box in info:
        if box is None:
            continue
        box = _union([box])
        # clip to the outer box (negative parts may reach beyond it)
        box = tuple(slice(max(b.start, o.start), min(b.stop, o.stop)) for b, o in zip(box, outer))
        if any(b.stop <= b.start for b in box):
            continue
        u, v, w = grid.local(*box, top=top, tilt=tilt)
        if shifted:
            u, v, w = np.broadcast_arrays(u, v, w)
        for f in shifted:
            side = f.region(u, v, w) & (f.signed(u, v, w) > 0)
            u = np.where(side, u - f.du, u)
            v = np.where(side, v - f.dv, v)
        m = part.mask(u, v, w)
        view = solid[_sub(box, outer)]
        if part.neg:
            view &= ~m
        else:
            view |= m
    gaps = []
    for f in fractures:
        u, v, w = grid.local(*outer, top=top, tilt=tilt)
        gaps.append(solid & f.region(u, v, w) & (np.abs(f.signed(u, v, w)) <= f.gap / 2))
    return outer, solid, gaps


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------


def _layout(rng: np.random.Generator, k: float) -> dict[str, dict]:
    """Per-level dimensions (mm) and craniocaudal position ``top`` (mm below the top of C1)."""
    levels: dict[str, dict] = {}
    h1 = 12.5 * k * rng.uniform(0.95, 1.05)
    levels["C1"] = dict(top=0.0, bh=h1, bottom=h1)
    s = h1 + 1.8 * k  # C1/C2 lateral joint
    for name in LEVELS[1:]:
        d = {key: (val * k * rng.uniform(0.96, 1.04) if isinstance(val, float) else val)
             for key, val in _DIMS[name].items()}
        d["ss"] = _DIMS[name]["ss"] * rng.uniform(0.85, 1.15)
        s += d["disc"]
        d["top"] = s
        d["bottom"] = s + d["bh"]
        s = d["bottom"]
        levels[name] = d
    return levels


def _c1_ring(k: float, dens_u: float, c2: dict) -> tuple[float, float, float]:
    """Centre and inner / outer AP radii of the atlas ring: its anterior arch 1.8 mm in front of the dens
    (radius 5 mm), its posterior arch behind the canal of C2."""
    front = dens_u - 5.0 * k - 1.8 * k
    ri_u = (c2["bd"] / 2 + c2["cd"] - front) / 2
    return front + ri_u, ri_u, ri_u + 5.0 * k


def _c1_parts(k: float, h1: float, dens_u: float, c2: dict) -> list[_Part]:
    c1u, ri_u, ro_u = _c1_ring(k, dens_u, c2)
    ri_v, ro_v = 14.0 * k, 19.5 * k
    lm_u, lm_v = dens_u + 1.5 * k, 15.5 * k
    parts = [
        _ring((c1u, 0.0), (ri_u, ri_v), (ro_u, ro_v), 0.2 * h1, 0.8 * h1, q=6),  # anterior + posterior arch
        _ell((c1u - ro_u + 1.0 * k, 0.0), (3.0 * k, 5.0 * k), 0.15 * h1, 0.85 * h1, q=4),  # anterior tubercle
        _ell((c1u + ro_u - 1.0 * k, 0.0), (3.0 * k, 6.0 * k), 0.25 * h1, 0.9 * h1, q=4),  # posterior tubercle
    ]
    parts += _mirror(lambda sd: _ell((lm_u, sd * lm_v), (8.5 * k, 6.0 * k), 0.0, h1, q=8))  # lateral masses
    parts += _mirror(lambda sd: _cap((dens_u + 1.0 * k, sd * 19.0 * k), (dens_u + 2.5 * k, sd * 36.0 * k),
                                     3.5 * k, 0.3 * h1, 0.75 * h1, q=4))  # transverse processes
    parts += _mirror(lambda sd: _ell((dens_u + 2.0 * k, sd * 26.0 * k), (2.6 * k, 2.6 * k), -5, h1 + 5,
                                     neg=True))  # foramina transversaria
    return parts


def _c2_parts(k: float, d: dict, dens_u: float, dens_tip: float, joint_below: float) -> list[_Part]:
    bw, bd, bh, cw, cd = d["bw"], d["bd"], d["bh"], d["cw"], d["cd"]
    pc = bd / 2 + cd  # posterior edge of the canal (midline)
    parts = [
        _ell((0.0, 0.0), (bd / 2, bw / 2), 0.0, bh, p=2.4, q=10),  # body
        _ell((dens_u, 0.0), (5.0 * k, 5.0 * k), dens_tip, 4.0 * k, q=2.5),  # dens
        _cap((pc - 1.0 * k, 0.0), (pc + d["sl"], 0.0), 3.2 * k, 0.45 * bh, 0.95 * bh, slope=d["ss"], uref=pc,
             q=4),  # spinous process
    ]
    parts += _mirror(lambda sd: _ell((0.5 * k, sd * (bw / 2 + 2.5 * k)), (8.0 * k, 5.5 * k), 0.0,
                                     0.4 * bh, q=8))  # superior articular facets
    parts += _mirror(lambda sd: _cap((bd / 2 - 2.0 * k, sd * (bw / 2 - 1.5 * k)),
                                     (bd / 2 + 6.0 * k, sd * (cw / 2 + 3.0 * k)), 3.2 * k, 0.1 * bh, 0.6 * bh,
                                     q=6))  # pedicles / pars
    parts += _mirror(lambda sd: _ell((bd / 2 + 7.0 * k, sd * (cw / 2 + 4.5 * k)), (6.0 * k, 5.0 * k),
                                     0.35 * bh, joint_below - 0.9 * k, slope=0.8, uref=bd / 2 + 7.0 * k,
                                     q=6))  # inferior articular processes
    parts += _mirror(lambda sd: _cap((bd / 2 + 9.0 * k, sd * (cw / 2 + 2.5 * k)), (pc + 1.0 * k, 0.0),
                                     2.6 * k, 0.3 * bh, 0.95 * bh, slope=0.3, uref=bd / 2 + 9.0 * k,
                                     q=6))  # laminae
    parts += _mirror(lambda sd: _cap((pc + d["sl"] - 4.0 * k, 0.0), (pc + d["sl"] + 1.0 * k, sd * 5.0 * k),
                                     2.6 * k, 0.45 * bh, 0.95 * bh, slope=d["ss"], uref=pc, q=4))  # bifid tip
    parts += _mirror(lambda sd: _ring((0.0, sd * (bw / 2 + 3.0 * k)), (2.2 * k, 2.2 * k), (4.0 * k, 4.0 * k),
                                      0.2 * bh, 0.55 * bh, q=4))  # transverse processes with foramina
    return parts


def _sub_parts(k: float, name: str, d: dict, joint_above: float, joint_below: float) -> list[_Part]:
    """C3..T2 (offsets in the level's own frame: w = 0 at its superior endplate)."""
    bw, bd, bh, cw, cd, sl, ss = d["bw"], d["bd"], d["bh"], d["cw"], d["cd"], d["sl"], d["ss"]
    thoracic = name.startswith("T")
    pc = bd / 2 + cd
    lm_u, lm_v = bd / 2 + (5.0 if not thoracic else 4.0) * k, cw / 2 + (5.0 if not thoracic else 4.0) * k
    lm_r = (6.0 * k, 5.0 * k) if not thoracic else (5.0 * k, 4.5 * k)
    spin_r = (2.4 if name in ("C3", "C4", "C5", "C6") else 3.0) * k
    parts = [
        _ell((0.0, 0.0), (bd / 2, bw / 2), 0.0, bh, p=2.4 if not thoracic else 2.1, q=10),  # body
        _cap((pc - 1.0 * k, 0.0), (pc + sl, 0.0), spin_r, 0.25 * bh, 0.85 * bh, slope=ss, uref=pc, q=4),
    ]
    if not thoracic:  # uncinate processes: lips rising from the lateral edges of the superior endplate
        parts += _mirror(lambda sd: _ell((0.0, sd * (bw / 2 - 1.2 * k)), (5.0 * k, 1.6 * k), -2.0 * k,
                                         0.3 * bh, q=2))
    parts += _mirror(lambda sd: _cap((bd / 2 - 3.0 * k, sd * (bw / 2 - 3.0 * k)),
                                     (bd / 2 + 4.0 * k, sd * (cw / 2 + 2.0 * k)),
                                     (2.6 if not thoracic else 3.2) * k, 0.12 * bh, 0.62 * bh, q=6))  # pedicles
    parts += _mirror(lambda sd: _ell((lm_u, sd * lm_v), lm_r, joint_above + 0.9 * k, joint_below - 0.9 * k,
                                     slope=0.9, uref=lm_u, q=6))  # articular pillars between facet joints
    parts += _mirror(lambda sd: _cap((lm_u + 3.0 * k, sd * (cw / 2 + 2.5 * k)), (pc + 1.0 * k, 0.0),
                                     (1.9 if not thoracic else 2.5) * k, 0.2 * bh, bh + 0.3 * d["disc"],
                                     slope=0.6 * ss, uref=lm_u + 3.0 * k, q=6))  # laminae
    if d["bifid"]:
        parts += _mirror(lambda sd: _cap((pc + sl - 4.0 * k, 0.0), (pc + sl + 1.0 * k, sd * 3.5 * k),
                                         2.0 * k, 0.25 * bh, 0.85 * bh, slope=ss, uref=pc, q=4))
    if d["foramen"]:  # transverse process ring around the foramen transversarium + tubercles
        fu, fv = 0.5 * k, bw / 2 + 3.8 * k
        parts += _mirror(lambda sd: _ring((fu, sd * fv), (2.3 * k, 2.3 * k), (4.3 * k, 4.3 * k), 0.3 * bh,
                                          0.8 * bh, q=4))
        parts += _mirror(lambda sd: _cap((fu, sd * (fv + 3.5 * k)), (fu - 1.0 * k, sd * d["tpr"]), 2.4 * k,
                                         0.35 * bh, 0.75 * bh, q=4))
    elif not thoracic:  # C7: long transverse process without a foramen
        parts += _mirror(lambda sd: _cap((bd / 2 + 2.0 * k, sd * (cw / 2 + 2.0 * k)),
                                         (bd / 2 - 1.0 * k, sd * d["tpr"]), 3.0 * k, 0.3 * bh, 0.75 * bh, q=4))
    else:  # T1/T2: posterolateral transverse processes
        tu = bd / 2 + 0.6 * cd
        parts += _mirror(lambda sd: _cap((tu, sd * (cw / 2 + 4.0 * k)), (tu + 7.0 * k, sd * d["tpr"]),
                                         3.8 * k, 0.05 * bh, 0.6 * bh, slope=0.3, uref=tu, q=4))
    return parts


def _rib_parts(k: float, d: dict) -> list[_Part]:
    """The rib of a thoracic level: head at the body, neck to the transverse process, then lateral/anterior."""
    bw, bd, bh, cd, tpr = d["bw"], d["bd"], d["bh"], d["cd"], d["tpr"]
    tu = bd / 2 + 0.6 * cd + 7.0 * k
    parts = []
    for sd in (1.0, -1.0):
        pts = [(bd / 2 - 4.0 * k, sd * (bw / 2 + 3.5 * k)), (tu - 3.0 * k, sd * (tpr - 5.0 * k)),
               (tu - 2.0 * k, sd * (tpr + 8.0 * k)), (bd / 2 - 8.0 * k, sd * (tpr + 24.0 * k)),
               (-25.0 * k, sd * (tpr + 31.0 * k)), (-55.0 * k, sd * (tpr + 30.0 * k))]
        w = 0.15 * bh
        for i, (a, b) in enumerate(zip(pts[:-1], pts[1:])):
            # the rib sinks caudally where it runs anteriorly
            drop = 0.2 * (a[0] - b[0]) if a[0] - b[0] > 1.0 else 0.0
            slope = drop / (b[0] - a[0]) if drop else 0.0
            parts.append(_cap(a, b, (3.2 if i == 0 else 3.6) * k, w, w + 10.0 * k, slope=slope, uref=a[0], q=4))
            w += drop
    return parts


def _paint_bone(hu, labels, grid, parts, top, tilt, *, label, cancellous, cortex, rng, fractures=(),
                gap_hu=55.0):
    """Paint a bone (cortical shell over cancellous core, fracture gaps) and its label; return gap masks."""
    outer, solid, gaps = _solid(grid, parts, top, tilt, fractures)
    if outer is None or not solid.any():
        return outer, []
    t_mm = 1.2
    ry = max(1, int(round(t_mm / grid.dy)))
    rx = max(1, int(round(t_mm / grid.dx)))
    rz = max(1, int(round(t_mm / grid.dz)))
    inner = ndimage.minimum_filter(solid.view(np.uint8), size=(2 * rz + 1, 2 * ry + 1, 2 * rx + 1),
                                   mode="nearest").astype(bool)
    shell = solid & ~inner
    view = hu[outer]
    tex = rng.normal(0.0, 55.0, size=int(inner.sum())).astype(np.float32)
    view[inner] = cancellous + tex
    view[shell] = cortex
    for g in gaps:
        view[g] = gap_hu
    if label:
        labels[outer][solid] = label
    return outer, gaps


def _fracture_plan(rng: np.random.Generator, name: str, k: float, d: dict, px: float, extra: dict
                   ) -> _Fracture:
    """Draw one cleft for vertebra ``name`` (local frame of its level)."""
    gap = max(rng.uniform(1.0, 2.0), 1.25 * px)
    if name == "C1":
        kind = "arch"
    elif name == "C2":
        kind = rng.choice(["dens", "body", "arch"], p=[0.35, 0.3, 0.35])
    else:
        kind = rng.choice(["body", "arch"], p=[0.55, 0.45])
    if kind == "dens":
        dens_u, dens_tip = extra["dens_u"], extra["dens_tip"]
        pw = rng.uniform(-4.0, -1.0) * k
        tilt = rng.normal(0, 0.15, 2)
        n = np.array([tilt[0], tilt[1], 1.0])
        n /= np.linalg.norm(n)
        ang = rng.uniform(0, 2 * np.pi)
        shift = rng.uniform(0.3, 1.6) * px
        # negative side (above the plane) is the displaced fragment: flip the normal so "positive" is above
        return _Fracture("dens", dens_u, 0.0, pw, tuple(-n), gap, dens_tip - 1.0, pw + gap, 5.0 * k + 1.5,
                         shift * math.cos(ang), shift * math.sin(ang))
    if kind == "body":
        bw, bd, bh = d["bw"], d["bd"], d["bh"]
        pu, pv = rng.uniform(-0.3, 0.3) * bd / 2, rng.uniform(-0.45, 0.45) * bw / 2
        phi = rng.uniform(0, np.pi)
        nw = rng.uniform(-0.25, 0.25)
        n = np.array([math.cos(phi), math.sin(phi), nw])
        n /= np.linalg.norm(n)
        if rng.random() < 0.45:
            wa, wb = -1.0, bh + 1.0
            shift = rng.uniform(0.0, 1.3) * px
        else:
            length = rng.uniform(3.0, 8.0) * k
            c = rng.uniform(0.15 * bh + length / 2, 0.85 * bh - length / 2) if 0.7 * bh > length else bh / 2
            wa, wb = c - length / 2, c + length / 2
            shift = rng.uniform(0.0, 0.6) * px
        pw = (wa + wb) / 2
        return _Fracture("body", pu, pv, pw, tuple(n), gap, wa, wb, max(bw, bd) / 2 + 1.0,
                         shift * n[0], shift * n[1])
    # arch: a cleft across one of the posterior/lateral bars
    bars = extra["bars"]
    a, b, r, w0, w1 = bars[int(rng.integers(len(bars)))]
    t = rng.uniform(0.3, 0.7)
    pu, pv = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    du, dv = b[0] - a[0], b[1] - a[1]
    ang = math.atan2(dv, du) + rng.normal(0, 0.3)
    n = (math.cos(ang), math.sin(ang), 0.0)
    return _Fracture("arch", pu, pv, (w0 + w1) / 2, n, gap, w0 - 2.0, w1 + 2.0, r + 2.5 * k)


def _arch_bars(name: str, k: float, d: dict, extra: dict) -> list[tuple]:
    """Bars (a, b, radius, w0, w1) an arch fracture may cross, in the level's frame."""
    if name == "C1":
        c1u, ri_u, ro_u, h1 = extra["c1u"], extra["ri_u"], extra["ro_u"], extra["h1"]
        m = (ri_u + ro_u) / 2
        bars = []
        for sd in (1.0, -1.0):
            bars.append(((c1u - m, 0.0), (c1u - 0.55 * m, sd * 12.0 * k), 2.5 * k, 0.2 * h1, 0.8 * h1))  # ant
            bars.append(((c1u + m, 0.0), (c1u + 0.45 * m, sd * 14.0 * k), 2.5 * k, 0.2 * h1, 0.8 * h1))  # post
        return bars
    bw, bd, bh, cw, cd = d["bw"], d["bd"], d["bh"], d["cw"], d["cd"]
    pc = bd / 2 + cd
    bars = []
    for sd in (1.0, -1.0):
        bars.append(((bd / 2 - 2.0 * k, sd * (bw / 2 - 2.0 * k)), (bd / 2 + 5.0 * k, sd * (cw / 2 + 2.5 * k)),
                     2.8 * k, 0.12 * bh, 0.62 * bh))  # pedicle / pars
        bars.append(((bd / 2 + 8.0 * k, sd * (cw / 2 + 2.5 * k)), (pc + 1.0 * k, 0.0), 2.2 * k, 0.3 * bh,
                     0.9 * bh))  # lamina
    return bars


def _body_outline(u, v, s, a):
    """Normalised radius of the skin outline (<= 1 inside) and of the fat/muscle boundary."""
    f32 = np.float32
    sh = np.clip(s - f32(a["s_shoulder"]), 0, None)
    rx = f32(a["neck_rx"]) + f32(1.6) * sh ** f32(1.25)
    ry_ant = f32(a["neck_ry_ant"]) + f32(0.35) * sh
    ry_post = f32(a["neck_ry_post"]) + f32(0.25) * sh
    # the face / floor of the mouth widens the outline anteriorly above the hyoid
    face = np.clip((f32(a["s_hyoid"]) - s) / f32(25.0), 0, 1)
    ry_ant = ry_ant + f32(30.0) * face
    rx = rx + f32(6.0) * face
    cu = f32(a["neck_cu"])
    ry = np.where(u < cu, ry_ant, ry_post)
    rho = ((u - cu) / ry) ** 2 + (v / rx) ** 2
    f = f32(a["fat"])
    rho_in = ((u - cu) / (ry - f)) ** 2 + (v / (rx - f)) ** 2
    return rho, rho_in


def _build_volume(rng: np.random.Generator, size: int, n_slices: int | None, fractures: dict[str, int],
                  frac_rng: np.random.Generator, tex_seed: np.random.SeedSequence):
    """Paint the study. ``rng`` draws the anatomy, ``frac_rng`` the fracture clefts; every bone's texture comes
    from its own stream of ``tex_seed``: so adding a fracture changes nothing but the fractured vertebra."""
    k = float(rng.uniform(0.88, 1.12))  # body size
    fov = float(rng.uniform(120.0, 160.0))
    px = round(fov / size, 6)
    levels = _layout(rng, k)
    c1, c2 = levels["C1"], levels["C2"]
    h1 = c1["bh"]
    dens_u = -2.0 * k
    dens_tip = rng.uniform(0.5, 2.5) * k  # dens tip: mm below the top of C1

    # field of view along the column (s, mm below the top of C1)
    s_top = float(rng.uniform(0.25, 0.45) * h1 if rng.random() < 0.12 else rng.uniform(-14.0, -4.0))
    if rng.random() < 0.15:  # stops above T1
        s_bot = float(rng.uniform(levels["C7"]["bottom"] + 0.5, levels["T1"]["top"] - 0.5))
    else:
        s_bot = float(rng.uniform(levels["T1"]["bottom"] - 2.0, levels["T2"]["bottom"] - 1.0))
    if n_slices is None:
        dz = float(rng.choice([0.5, 0.625, 0.7, 0.75, 0.8, 1.0]))
        Z = int(round((s_bot - s_top) / dz)) + 1
    else:
        if n_slices < 2:
            raise ValueError(f"n_slices must be >= 2, got {n_slices}")
        Z = int(n_slices)
        dz = round((s_bot - s_top) / (Z - 1), 4)
    H = W = int(size)

    # spine path (image mm): lordosis in the neck, kyphosis below; lateral drift; axial rotation
    lordosis = float(rng.uniform(0.0, 11.0) * k)
    L = levels["C7"]["bottom"]
    slope_t = lordosis * math.pi / L
    col_y0 = fov / 2 + rng.uniform(-6.0, 10.0)  # body centre of C1..C2 a bit posterior of the FOV centre
    col_x0 = fov / 2 + rng.uniform(-8.0, 8.0)
    lat = rng.uniform(-0.06, 0.06)
    rot0, rot1 = rng.uniform(-0.12, 0.12), rng.uniform(-0.06, 0.06)
    s_all = s_top + dz * np.arange(Z)

    def path(s):
        s = np.asarray(s, float)
        y = np.where(s <= L, -lordosis * np.sin(np.pi * np.clip(s, 0, L) / L), slope_t * (s - L))
        return col_y0 + y, col_x0 + lat * s + 1.5 * np.sin(s / 40.0)

    def dpath(s):  # dy/ds of the column (for endplate tilt)
        return float(-lordosis * np.pi / L * np.cos(np.pi * s / L)) if s <= L else slope_t

    yc, xc = path(s_all)
    theta = rot0 + rot1 * np.sin(np.pi * s_all / L)
    grid = _Grid((Z, H, W), (dz, px, px), s_top, yc, xc, theta)

    # soft tissue parameters
    a = dict(
        s_shoulder=levels["C6"]["top"] + rng.uniform(-3, 8),
        s_hyoid=levels["C3"]["top"] + 0.5 * levels["C3"]["bh"],
        neck_rx=rng.uniform(50.0, 62.0) * k,
        neck_ry_ant=rng.uniform(45.0, 55.0) * k,
        neck_ry_post=rng.uniform(62.0, 75.0) * k,
        neck_cu=rng.uniform(6.0, 14.0) * k,
        fat=rng.uniform(3.0, 9.0),
    )
    hu_muscle = rng.uniform(40, 60)
    hu_fat = rng.uniform(-110, -85)
    density = rng.uniform(0.7, 1.1)  # bone mineral density factor
    canc = 300.0 * density
    cort = rng.uniform(1100, 1450) * (0.85 + 0.15 * density)

    hu = np.full((Z, H, W), -1000.0, np.float32)
    labels = np.zeros((Z, H, W), np.uint8)

    # per-slice profiles interpolated from level positions
    mids = np.array([levels[n]["top"] + levels[n]["bh"] / 2 for n in LEVELS[1:]])
    bd_prof = np.interp(s_all, mids, [levels[n]["bd"] for n in LEVELS[1:]])
    cd_prof = np.interp(s_all, mids, [levels[n]["cd"] for n in LEVELS[1:]])
    cw_prof = np.interp(s_all, mids, [levels[n]["cw"] for n in LEVELS[1:]])
    air_knots = np.array([-20.0, levels["C3"]["top"], levels["C4"]["top"], levels["C5"]["top"],
                          levels["C6"]["top"], 400.0])
    air_ry = np.interp(s_all, air_knots, np.array([7.0, 6.5, 7.0, 8.0, 8.0, 8.5]) * k)
    air_rx = np.interp(s_all, air_knots, np.array([16.0, 15.0, 11.0, 8.0, 8.5, 9.5]) * k)
    prevert = np.interp(s_all, air_knots, np.array([4.0, 4.0, 5.0, 7.0, 13.0, 14.0]) * k)
    air_u = -(bd_prof / 2 + prevert + air_ry)
    s_apex = levels["T1"]["top"] + rng.uniform(-2.0, 6.0)
    table = rng.random() < 0.6
    table_y = float((yc + a["neck_ry_post"] + a["neck_cu"]).max()) + rng.uniform(3.0, 12.0)
    hu_lung = rng.uniform(-870, -820)

    f32 = np.float32
    lt = {n: (levels[n]["top"], levels[n]["bottom"]) for n in LEVELS[1:]}
    zones = dict(  # s ranges of the structures that exist only at some levels
        larynx=(lt["C4"][0] - 2.0, lt["C6"][0]), trachea=(lt["C6"][0], np.inf),
        thyroid=(lt["C6"][0] + 2.0, lt["T1"][1]), lung=(s_apex, np.inf))
    prof = {name: arr.astype(f32)[:, None, None] for name, arr in
            dict(bd=bd_prof, cd=cd_prof, cw=cw_prof, au=air_u, arx=air_rx, ary=air_ry).items()}
    chunk = 32
    for z0 in range(0, Z, chunk):
        zs = slice(z0, min(z0 + chunk, Z))
        u, v, _ = grid.local(zs, slice(0, H), slice(0, W))
        s = grid.s[zs].astype(f32)[:, None, None]
        rho, rho_in = _body_outline(u, v, s, a)
        inside, core = rho <= 1, rho_in <= 1
        view = hu[zs]
        if table:  # a curved carbon-fibre table top, straight in image coordinates
            yy = grid.y[None, :, None]
            y_top = table_y - 0.004 * (grid.x[None, None, :] - fov / 2) ** 2
            view[np.broadcast_to((yy >= y_top) & (yy <= y_top + 4.0), view.shape)] = 180.0
        view[inside] = hu_fat
        view[core] = hu_muscle
        av = np.abs(v)
        # spinal canal (CSF) and cord
        bdp, cdp, cwp = prof["bd"][zs], prof["cd"][zs], prof["cw"][zs]
        cu_ = bdp / 2 + cdp / 2
        canal = ((u - cu_) / (cdp / 2)) ** 2 + (v / (cwp / 2)) ** 2 <= 1
        view[canal] = 18.0
        cord = ((u - cu_) / (cdp / 4.2)) ** 2 + (v / (cwp / 4.8)) ** 2 <= 1
        view[cord] = 36.0
        # airway: pharynx -> larynx -> trachea, laryngeal and tracheal cartilage, thyroid gland, lung apices
        au, arx, ary = prof["au"][zs], prof["arx"][zs], prof["ary"][zs]
        dua = u - au
        for zone in ("thyroid", "larynx", "trachea", "lung"):
            lo, hi = zones[zone]
            sel = slice(int(np.searchsorted(grid.s[zs], lo)), int(np.searchsorted(grid.s[zs], hi)))
            if sel.stop <= sel.start:
                continue
            uu, vv, aa, du2 = u[sel], av[sel], (arx[sel], ary[sel]), dua[sel]
            if zone == "thyroid":
                m = (((du2 - f32(2.0 * k)) / f32(8.0 * k)) ** 2 + ((vv - aa[0] - f32(8.0 * k)) / f32(7.0 * k)) ** 2
                     <= 1)
                view[sel][m & core[sel]] = 85.0
            elif zone == "larynx":
                m = np.abs((du2 / (aa[1] + f32(3.0 * k))) ** 2 + (vv / (aa[0] + f32(3.0 * k))) ** 2 - 1) < 0.2
                view[sel][m & (du2 < f32(2.0 * k))] = 160.0
            elif zone == "trachea":
                m = np.abs((du2 / (aa[1] + f32(1.5 * k))) ** 2 + (vv / (aa[0] + f32(1.5 * k))) ** 2 - 1) < 0.25
                view[sel][m & (du2 < 0.5 * aa[1])] = 110.0
            else:
                r_l = (np.minimum(32.0 * k, 4.5 * np.sqrt(np.clip(grid.s[zs][sel] - s_apex, 0, None))) + 1e-3)
                r_l = r_l.astype(f32)[:, None, None]
                lung_v = f32(levels["T1"]["bw"] / 2 + 12.0 * k) + r_l
                m = ((uu - f32(2.0 * k)) / (r_l * f32(1.15))) ** 2 + ((vv - lung_v) / r_l) ** 2 <= 1
                view[sel][m & core[sel]] = hu_lung
        air = (dua / ary) ** 2 + (v / arx) ** 2 <= 1
        view[air & inside] = -990.0

    # discs between bodies (label 0), painted before the bones
    for upper, lower in zip(LEVELS[1:-1], LEVELS[2:]):
        du_, dl = levels[upper], levels[lower]
        bd, bw = (du_["bd"] + dl["bd"]) / 2, (du_["bw"] + dl["bw"]) / 2
        top, tilt = dl["top"], dpath(dl["top"] - dl["disc"] / 2)
        outer, solid, _ = _solid(grid, [_ell((0.0, 0.0), (bd / 2, bw / 2), -dl["disc"] - 0.6, 0.6, p=2.3)],
                                 top, tilt)
        if outer is not None:
            hu[outer][solid] = 95.0
        outer, nucleus, _ = _solid(grid, [_ell((0.5, 0.0), (bd / 3.4, bw / 3.4), -dl["disc"] + 0.8, -0.8)],
                                   top, tilt)
        if outer is not None:
            hu[outer][nucleus] = 70.0

    tex_streams = iter(tex_seed.spawn(64))

    def bone_args():
        return dict(cancellous=canc, cortex=cort, rng=np.random.default_rng(next(tex_streams)))

    # non-vertebral bones (label 0): occiput, mandible, hyoid, ribs, clavicles, manubrium
    c1u = _c1_ring(k, dens_u, c2)[0]
    occ = [
        _ell((dens_u + 2.0 * k, 15.0 * k), (8.0 * k, 5.5 * k), -12.0 * k, -1.8 * k, q=3),  # occipital condyles
        _ell((dens_u + 2.0 * k, -15.0 * k), (8.0 * k, 5.5 * k), -12.0 * k, -1.8 * k, q=3),
        # rim of the foramen magnum, then the occipital bone widening upwards behind it
        _ring((c1u + 1.0 * k, 0.0), (18.0 * k, 16.0 * k), (25.0 * k, 22.0 * k), -12.0 * k, -6.5 * k,
              umin=c1u - 12.0 * k),
        _ring((c1u + 2.0 * k, 0.0), (24.0 * k, 24.0 * k), (31.0 * k, 30.0 * k), -19.0 * k, -11.5 * k,
              umin=c1u - 8.0 * k),
        _ring((c1u + 4.0 * k, 0.0), (32.0 * k, 38.0 * k), (38.0 * k, 44.0 * k), -45.0, -18.5 * k,
              umin=c1u - 4.0 * k),
        _ell((c1u - 27.0 * k, 0.0), (10.0 * k, 12.0 * k), -40.0, -6.0 * k, slope=0.8,
             uref=c1u - 27.0 * k),  # clivus
        _ell((c1u + 2.0 * k, 44.0 * k), (10.0 * k, 8.0 * k), -40.0, -3.0 * k, q=3),  # mastoids
        _ell((c1u + 2.0 * k, -44.0 * k), (10.0 * k, 8.0 * k), -40.0, -3.0 * k, q=3),
    ]
    _paint_bone(hu, labels, grid, occ, 0.0, dpath(0.0), label=0, **bone_args())
    s_mand = c2["top"] - 4.0 * k
    mand_c = dens_u - 30.0 * k
    mand = [_ring((mand_c, 0.0), (21.0 * k, 33.0 * k), (27.0 * k, 39.0 * k), 0.0,
                  levels["C3"]["top"] + 2.0 - s_mand, umax=mand_c + 12.0 * k, q=6)]
    _paint_bone(hu, labels, grid, mand, s_mand, 0.0, label=0, **bone_args())
    hy_top = levels["C3"]["top"] + 0.5 * levels["C3"]["bh"]
    i_hy = int(np.argmin(np.abs(s_all - hy_top)))
    hy_c = float(air_u[i_hy] - air_ry[i_hy]) - 9.0 * k
    hyoid = [_ring((hy_c + 8.0 * k, 0.0), (10.0 * k, 15.0 * k), (13.0 * k, 19.0 * k), 0.0, 4.0 * k,
                   umax=hy_c + 14.0 * k, q=4)]
    _paint_bone(hu, labels, grid, hyoid, hy_top, 0.0, label=0, **bone_args())
    t1 = levels["T1"]
    clav = _mirror(lambda sd: _cap((-48.0 * k, sd * 22.0 * k), (-22.0 * k, sd * 85.0 * k), 5.0 * k, 0.0, 12.0 * k,
                                   q=3))
    clav.append(_ell((-55.0 * k, 0.0), (6.0 * k, 24.0 * k), 9.0 * k, 60.0))  # manubrium
    _paint_bone(hu, labels, grid, clav, t1["top"] + 4.0 * k, 0.0, label=0, **bone_args())
    for name in ("T1", "T2"):
        d = levels[name]
        _paint_bone(hu, labels, grid, _rib_parts(k, d), d["top"], dpath(d["top"]), label=0, **bone_args())

    # vertebrae
    joints = {}  # facet joint level (mm, in s) above each level
    for name in LEVELS[2:]:
        d = levels[name]
        joints[name] = d["top"] - 0.35 * d["disc"]
    joints["T3"] = levels["T2"]["bottom"] + 2.0
    sites: list[dict] = []
    boxes: list[dict] = []
    c1_extra = {}
    for i, name in enumerate(LEVELS):
        d = levels[name]
        top = d["top"]
        tilt = dpath(top + d["bh"] / 2)
        if name == "C1":
            parts = _c1_parts(k, h1, dens_u, c2)
            c1u, ri_u, ro_u = _c1_ring(k, dens_u, c2)
            c1_extra = dict(c1u=c1u, ri_u=ri_u, ro_u=ro_u, h1=h1)
            extra = dict(c1_extra)
        elif name == "C2":
            nxt = LEVELS[i + 1]
            parts = _c2_parts(k, d, dens_u, dens_tip - top, joints[nxt] - top)
            extra = dict(dens_u=dens_u, dens_tip=dens_tip - top)
        else:
            nxt = LEVELS[i + 1] if i + 1 < len(LEVELS) else "T3"
            parts = _sub_parts(k, name, d, joints[name] - top, joints[nxt] - top)
            extra = {}
        plans = []
        if fractures.get(name):
            extra["bars"] = _arch_bars(name, k, d, c1_extra)
            for _ in range(2 if frac_rng.random() < 0.2 else 1):
                for attempt in range(12):  # a cleft must show in the field of view: >= 2 voxels on some slice
                    plan = _fracture_plan(frac_rng, name, k, d, px, extra)
                    _, _, (gap,) = _solid(grid, parts, top, tilt, [plan])
                    if gap is not None and gap.sum(axis=(1, 2)).max(initial=0) >= 2:
                        break
                else:
                    log.warning("synthetic %s fracture shows on no slice of a %s volume (%.2f mm slices): its label "
                                "stays 1 but it gets no box; use more slices or pixels", name, (Z, H, W), dz)
                plans.append(plan)
        outer, gaps = _paint_bone(hu, labels, grid, parts, top, tilt, label=LEVEL_LABELS[name],
                                  fractures=plans, **bone_args())
        for f, g in zip(plans, gaps):
            shown = []
            for zi in range(g.shape[0]):
                m = g[zi]
                if m.sum() < 2:
                    continue
                rows, cols = np.nonzero(m)
                rr0, rr1 = rows.min() + outer[1].start, rows.max() + outer[1].start
                cc0, cc1 = cols.min() + outer[2].start, cols.max() + outer[2].start
                margin = max(2.0, 3.0 / px)
                x0, y0 = max(cc0 - margin, 0.0), max(rr0 - margin, 0.0)
                x1, y1 = min(cc1 + 1 + margin, float(W)), min(rr1 + 1 + margin, float(H))
                zi_abs = zi + outer[0].start
                boxes.append(dict(x=round(float(x0), 2), y=round(float(y0), 2), width=round(float(x1 - x0), 2),
                                  height=round(float(y1 - y0), 2), slice_index=int(zi_abs), vertebra=name))
                shown.append(int(zi_abs))
            sites.append(dict(vertebra=name, kind=str(f.kind), slices=shown))

    meta = dict(scale=round(k, 4), fov_mm=round(fov, 3), lordosis_mm=round(lordosis, 3), dz=dz,
                s_top=round(s_top, 3), s_bottom=round(s_bot, 3), bone_density=round(float(density), 3),
                table=bool(table), levels={n: dict(top=round(float(levels[n]["top"]), 3),
                                                   bottom=round(float(levels[n]["bottom"]), 3))
                                             for n in LEVELS})
    return hu, labels, (dz, px, px), boxes, sites, meta, grid


def make_study(seed: int, *, size: int = 128, n_slices: int | None = None, fractures: dict[str, int] | None = None,
               uid: str | None = None, noise_hu: float | None = None) -> SyntheticStudy:
    """Build one synthetic study.

    Args:
        seed: everything (anatomy, geometry, labels, noise) follows from it.
        size: rows = columns. The in-plane field of view is 120-160 mm whatever the size, so the pixel spacing
            is fov / size (~1 mm at 128, ~0.27 mm at 512).
        n_slices: force the slice count; the covered anatomy stays the drawn one and the slice spacing becomes
            extent / (n_slices - 1). Default: spacing drawn from 0.5-1.0 mm (~190-400 slices).
        fractures: C1..C7 -> 0/1 (missing keys = 0); default: drawn with :func:`sample_fractures`.
        uid: StudyInstanceUID; default ``UID_PREFIX + <number from seed>``.
        noise_hu: scanner noise sigma; default drawn from 15-25 HU.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    streams = np.random.SeedSequence(int(seed)).spawn(5)  # labels, anatomy, fractures, texture, noise
    rng = np.random.default_rng(streams[1])
    if fractures is None:
        labels_drawn = sample_fractures(np.random.default_rng(streams[0]))
    else:
        unknown = set(fractures) - set(VERTEBRAE)
        if unknown:
            raise ValueError(f"fractures: unknown vertebrae {sorted(unknown)}; expected keys among {VERTEBRAE}")
        labels_drawn = {v: int(bool(fractures.get(v, 0))) for v in VERTEBRAE}
    if uid is None:
        uid = f"{UID_PREFIX}{10000 + int(seed) % 89999}"
    if not uid.startswith(UID_PREFIX):
        raise ValueError(f"uid {uid!r} must start with {UID_PREFIX!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    hu, labels, spacing, boxes, sites, meta, grid = _build_volume(rng, size, n_slices, labels_drawn,
                                                                  np.random.default_rng(streams[2]), streams[3])

    # partial-volume blur, scanner noise, quantisation
    sig = 0.6
    hu = ndimage.gaussian_filter(hu, (0.5, sig, sig), truncate=2.5)
    sigma_n = float(rng.uniform(15.0, 25.0)) if noise_hu is None else float(noise_hu)
    hu += np.random.default_rng(streams[4]).standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma_n)
    np.clip(hu, HU_RANGE[0], HU_RANGE[1], out=hu)
    hu = np.rint(hu).astype(np.int16)

    # patient position (LPS mm) of voxel (0, 0, 0); table coordinates like a scanner's
    x0 = round(float(-spacing[2] * (size - 1) / 2 + rng.uniform(-20, 20)), 3)
    y0 = round(float(-spacing[1] * (size - 1) / 2 + rng.uniform(-30, 30)), 3)
    z0 = round(float(rng.uniform(-180.0, 40.0)), 3)
    meta["noise_hu"] = round(sigma_n, 3)
    return SyntheticStudy(uid=uid, hu=hu, labels=labels, fractures=labels_drawn, boxes=boxes,
                          spacing=tuple(float(s) for s in spacing), origin=(x0, y0, z0), seed=int(seed),
                          fracture_sites=sites, meta=meta)


# ---------------------------------------------------------------------------------------------------------
# JPEG Lossless (Process 14, first-order prediction) encoder
# ---------------------------------------------------------------------------------------------------------


def _huffman_bits(freq: np.ndarray) -> tuple[list[int], list[int]]:
    """JPEG Huffman table (BITS[1..16], HUFFVAL) for symbol frequencies (ITU T.81 Annex K.2)."""
    import heapq

    symbols = [int(s) for s in np.flatnonzero(freq)]
    # code sizes from a Huffman tree, with a reserved symbol (-1, frequency 0) so no code is all ones
    heap = [(int(freq[s]), i, [s]) for i, s in enumerate(symbols)] + [(0, len(symbols), [-1])]
    heapq.heapify(heap)
    size = {s: 0 for s in symbols + [-1]}
    counter = len(symbols) + 1
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        for s in a + b:
            size[s] += 1
        heapq.heappush(heap, (f1 + f2, counter, a + b))
        counter += 1
    bits = [0] * 33
    for s in size.values():
        bits[s] += 1
    # limit code lengths to 16 (Figure K.3)
    i = 32
    while i > 16:
        if bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        else:
            i -= 1
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved code point
    # symbols by decreasing frequency get the shortest codes
    huffval = sorted(symbols, key=lambda s: (-int(freq[s]), s))
    return bits[1:17], huffval


def encode_jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """Encode one frame as a JPEG Lossless (Process 14, selection value 1) bytestream.

    Args:
        pixels: (rows, columns) unsigned samples below ``2 ** precision`` (for signed DICOM data: the two's
            complement bit pattern masked to ``precision`` bits).
        precision: sample precision P, 2..16 (= BitsStored).

    Returns:
        SOI, SOF3, DHT (one table fitted to the image), SOS (predictor 1, point transform 0), the Huffman coded
        differences with 0xFF byte stuffing, EOI.
    """
    x = np.asarray(pixels)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, columns) frame, got shape {x.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16, got {precision}")
    x = x.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= 1 << precision):
        raise ValueError(f"samples must be in [0, {(1 << precision) - 1}] for precision {precision}, "
                         f"got [{x.min()}, {x.max()}]")
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra, the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first column: Rb, the sample above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred).ravel() & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)  # -32768 .. 32767; -32768 codes as category 16
    mag = np.abs(diff)
    ssss = np.frexp(mag.astype(np.float64))[1].astype(np.int64)  # bit length, 0 for 0; 16 for 32768
    freq = np.bincount(ssss, minlength=17)
    bits, huffval = _huffman_bits(freq)
    # canonical codes (Annex C)
    code_of = np.zeros(17, np.int64)
    len_of = np.zeros(17, np.int64)
    code, idx = 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            code_of[huffval[idx]], len_of[huffval[idx]] = code, length
            code += 1
            idx += 1
        code <<= 1
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(diff >= 0, diff, diff - 1) & ((np.int64(1) << extra_len) - 1)
    value = (code_of[ssss] << extra_len) | extra
    nbits = len_of[ssss] + extra_len  # <= 32
    end = np.cumsum(nbits)
    total = int(end[-1]) if end.size else 0
    start = end - nbits
    # place each code in a 64-bit window aligned to 32-bit words, then add the (disjoint) halves per word
    word = start >> 5
    off = start & 31
    shifted = value.astype(np.uint64) << (64 - off - nbits).astype(np.uint64)
    hi = (shifted >> np.uint64(32)).astype(np.float64)
    lo = (shifted & np.uint64(0xFFFFFFFF)).astype(np.float64)
    n_words = (total >> 5) + 2
    words = (np.bincount(word, weights=hi, minlength=n_words)
             + np.bincount(word + 1, weights=lo, minlength=n_words)).astype(np.uint64)
    data = words.astype(">u4").tobytes()
    n_bytes = (total + 7) // 8
    buf = np.frombuffer(data[:n_bytes], np.uint8).copy()
    if total % 8:
        buf[-1] |= (1 << (8 - total % 8)) - 1  # pad the last byte with 1-bits
    ff = np.flatnonzero(buf == 0xFF)
    if ff.size:
        buf = np.insert(buf, ff + 1, 0)  # byte stuffing
    sof = bytes([0xFF, 0xC3, 0, 11, precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes(
        [1, 1, 0x11, 0])
    dht_body = bytes([0x00]) + bytes(bits) + bytes(huffval)
    dht = bytes([0xFF, 0xC4]) + (len(dht_body) + 2).to_bytes(2, "big") + dht_body
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + buf.tobytes() + b"\xff\xd9"


# ---------------------------------------------------------------------------------------------------------
# DICOM / NIfTI writers
# ---------------------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A DS string (<= 16 characters) for a number."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The stored values a (BitsStored, PixelRepresentation) pair can hold."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def write_study(study: SyntheticStudy, study_dir: str | os.PathLike, *, transfer_syntax: str = "explicit",
                head_first: bool = True, intercept: int = -1024, bits_stored: int = 16, signed: bool = True,
                modality: bool = True) -> list[Path]:
    """Write ``study`` as one CT DICOM file per slice, ``<InstanceNumber>.dcm``.

    Args:
        study_dir: created if missing.
        transfer_syntax: a key of :data:`TRANSFER_SYNTAXES`.
        head_first: InstanceNumber 1 = most superior slice (True) or most inferior (False, feet -> head).
        intercept: RescaleIntercept (slope is always 1): stored = HU - intercept.
        bits_stored: 12 or 16 (BitsAllocated is 16, HighBit = BitsStored - 1).
        signed: PixelRepresentation 1 (two's complement; with 12 bits the upper 4 bits are written as 0, so a
            reader must sign-extend) or 0.
        modality: write Modality "CT"; False omits (0008,0060) like a real training slice.

    Returns:
        The written paths, in InstanceNumber order. HU values the chosen encoding cannot represent are clipped
        (with a warning); every combination in :data:`EXACT_ENCODINGS` round-trips ``study.hu`` exactly.
    """
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; available: {sorted(TRANSFER_SYNTAXES)}")
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    Z, H, W = study.hu.shape
    dz, dy, dx = study.spacing

    stored = study.hu.astype(np.int32) - int(intercept)
    lo, hi = stored_range(bits_stored, signed)
    if stored.min() < lo or stored.max() > hi:
        log.warning("study %s: HU outside what BitsStored=%d, signed=%s, intercept=%d can hold; clipped to "
                    "[%d, %d] HU", study.uid, bits_stored, signed, intercept, lo + intercept, hi + intercept)
        stored = np.clip(stored, lo, hi)
    mask = (1 << bits_stored) - 1
    raw = (stored & mask).astype(np.uint16)  # the bit pattern of each sample, upper bits 0

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = _CT_IMAGE_STORAGE
    if modality:
        base.Modality = "CT"
    base.Manufacturer = "kit.synthetic"
    base.PatientName = study.uid.rsplit(".", 1)[-1]
    base.PatientID = study.uid.rsplit(".", 1)[-1]
    base.BodyPartExamined = "CSPINE"
    base.SliceThickness = _ds(dz)
    base.KVP = "120"
    base.ConvolutionKernel = "BONE"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study.uid
    base.SeriesInstanceUID = f"{study.uid}.1"
    base.StudyID = ""
    base.SeriesNumber = 1
    base.FrameOfReferenceUID = f"{study.uid}.2"
    base.ImageOrientationPatient = [_ds(v) for v in study.orientation]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = H
    base.Columns = W
    base.PixelSpacing = [_ds(dy), _ds(dx)]
    base.BitsAllocated = 16
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = int(signed)
    center, width = WINDOWS["bone"]
    base.WindowCenter = _ds(center)
    base.WindowWidth = _ds(width)
    base.RescaleIntercept = _ds(intercept)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"

    compressed = transfer_syntax not in ("explicit", "implicit", "big-endian")
    if compressed:
        base.LossyImageCompression = "00"
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = f"{study.uid}.1.1"
    meta.TransferSyntaxUID = ts_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    series = _SeriesEncoder(base, meta)

    encoder = plugin = None
    if transfer_syntax in ("rle", "jpeg2000", "jpeg-ls"):
        from pydicom.pixels import encoders

        encoder = {"rle": encoders.RLELosslessEncoder, "jpeg2000": getattr(encoders, "JPEG2000LosslessEncoder", None),
                   "jpeg-ls": getattr(encoders, "JPEGLSLosslessEncoder", None)}[transfer_syntax]
        plugin = "pylibjpeg" if transfer_syntax == "rle" and "pylibjpeg" in encoder.available_plugins else ""
    instance = study.instance_numbers(head_first)
    paths = []
    for hu_index in np.argsort(instance):
        n = int(instance[hu_index])
        frame = raw[hu_index]
        if transfer_syntax in ("explicit", "implicit"):
            pixel_data = DataElement(0x7FE00010, "OW", frame.astype("<u2").tobytes())
        elif transfer_syntax == "big-endian":
            pixel_data = DataElement(0x7FE00010, "OW", frame.astype(">u2").tobytes())
        else:
            if transfer_syntax == "jpeg-lossless":
                encoded = encode_jpeg_lossless(frame, bits_stored)
            else:
                arr = stored[hu_index].astype(np.int16 if signed else np.uint16)
                encoded = encoder.encode(arr, encoding_plugin=plugin, rows=H, columns=W, samples_per_pixel=1,
                                         bits_allocated=16, bits_stored=bits_stored, pixel_representation=int(signed),
                                         photometric_interpretation="MONOCHROME2", number_of_frames=1)
            pixel_data = DataElement(0x7FE00010, "OB", encapsulate([encoded], has_bot=True),
                                     is_undefined_length=True)
        pos = study.position(int(hu_index))
        sop_uid = f"{study.uid}.1.{n}"
        elements = [DataElement(0x00080018, "UI", sop_uid), DataElement(0x00200013, "IS", str(n)),
                    DataElement(0x00200032, "DS", [_ds(p) for p in pos]), DataElement(0x00201041, "DS", _ds(pos[2])),
                    pixel_data]
        path = study_dir / f"{n}.dcm"
        path.write_bytes(series.encode(elements, sop_uid))
        paths.append(path)
    return paths


class _SeriesEncoder:
    """Encodes the files of one series with pydicom's element writers, the invariant elements only once.

    A file is the 128-byte preamble, "DICM", the file meta group (explicit VR little endian, with its group
    length) and the dataset in the transfer syntax of ``meta``; the per-slice elements are slotted between the
    pre-encoded runs of invariant ones, so the bytes equal ``pydicom.dcmwrite(..., enforce_file_format=True)``
    of the whole dataset (``dataset()`` builds it; the tests compare the two).
    """

    def __init__(self, base, meta, dynamic=(0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)):
        from pydicom.dataset import Dataset
        from pydicom.uid import UID

        syntax = UID(meta.TransferSyntaxUID)
        self.implicit, self.little = syntax.is_implicit_VR, syntax.is_little_endian
        self.base, self.meta, self.dynamic = base, meta, sorted(dynamic)
        bounds = [-1, *self.dynamic, 1 << 32]
        self.runs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = Dataset()
            for elem in base:
                if lo < elem.tag < hi:
                    part.add(elem)
            self.runs.append(self._encode(part, self.implicit, self.little, base.get("SpecificCharacterSet")))

    @staticmethod
    def _encode(ds, implicit: bool, little: bool, charset=None) -> bytes:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_dataset(fp, ds, charset or "iso8859")
        return fp.getvalue()

    def _meta_bytes(self, sop_uid: str) -> bytes:
        from pydicom.dataset import Dataset

        meta = Dataset()
        for elem in self.meta:
            if elem.tag != 0x00020000:
                meta.add(elem)
        meta.MediaStorageSOPInstanceUID = sop_uid
        body = self._encode(meta, False, True)
        return b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little") + body

    def encode(self, elements, sop_uid: str) -> bytes:
        """File bytes for one slice; ``elements`` are the per-slice DataElements (tags as in ``dynamic``)."""
        from pydicom.dataset import Dataset

        by_tag = {int(e.tag): e for e in elements}
        if sorted(by_tag) != self.dynamic:
            raise ValueError(f"expected elements {[hex(t) for t in self.dynamic]}, got {[hex(t) for t in by_tag]}")
        chunks = [b"\x00" * 128, b"DICM", self._meta_bytes(sop_uid), self.runs[0]]
        charset = self.base.get("SpecificCharacterSet")
        for tag, run in zip(self.dynamic, self.runs[1:]):
            one = Dataset()
            one.add(by_tag[tag])
            chunks += [self._encode(one, self.implicit, self.little, charset), run]
        return b"".join(chunks)

    def dataset(self, elements, sop_uid: str):
        """The same slice as a complete pydicom Dataset (slow; for checks)."""
        import copy

        ds = copy.deepcopy(self.base)
        ds.file_meta = copy.deepcopy(self.meta)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.preamble = b"\x00" * 128
        for elem in elements:
            ds.add(elem)
        return ds


def segmentation_affine(study: SyntheticStudy, head_first: bool = True) -> np.ndarray:
    """(4, 4) RAS affine of the raw array :func:`write_segmentation` stores for ``study``.

    Raw voxel (i, j, kk): column i, row H-1-j, the slice with InstanceNumber Z-kk.
    """
    Z, H, W = study.hu.shape
    dz, dy, dx = study.spacing
    row_dir = np.array(study.orientation[:3], float)
    col_dir = np.array(study.orientation[3:], float)
    normal = np.cross(row_dir, col_dir)  # +z (superior) for [1,0,0,0,1,0]
    origin = np.array(study.origin, float)
    # LPS of raw voxel (0, 0, 0): column 0, row H-1, slice with InstanceNumber Z
    hu_first = 0 if not head_first else Z - 1  # hu index of the slice with InstanceNumber Z
    p0 = origin + (H - 1) * dy * col_dir - hu_first * dz * normal
    step_k = dz * normal if head_first else -dz * normal
    lps = np.eye(4)
    lps[:3, 0] = dx * row_dir
    lps[:3, 1] = -dy * col_dir
    lps[:3, 2] = step_k
    lps[:3, 3] = p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_segmentation(study: SyntheticStudy, nii_path: str | os.PathLike, *, head_first: bool = True) -> Path:
    """Write the label volume as ``<uid>.nii`` the way the competition stores its segmentations.

    The raw array has shape (W, H, Z): ``raw[:, ::-1, ::-1].transpose(1, 0, 2)`` is (H, W, Z) with z in
    InstanceNumber order (the public notebooks' recipe), for the series written with the same ``head_first``.
    The affine (RAS, mm, qform and sform code 1) maps raw voxels onto the DICOM geometry, so aligning through it
    needs no flips. Labels: 1..7 = C1..C7, 8 = T1, 9 = T2, 0 = background.
    """
    import nibabel as nib

    nii_path = Path(nii_path)
    nii_path.parent.mkdir(parents=True, exist_ok=True)
    labels = study.labels
    inst = labels if head_first else labels[::-1]  # InstanceNumber order along axis 0
    hwz = inst.transpose(1, 2, 0)  # (H, W, Z) in InstanceNumber order
    raw = np.ascontiguousarray(hwz[::-1, :, ::-1].transpose(1, 0, 2)).astype(np.uint8)
    affine = segmentation_affine(study, head_first)
    img = nib.Nifti1Image(raw, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(nii_path))
    return nii_path


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def _balanced(rng: np.random.Generator, values: list, n: int) -> list:
    """n values covering every value as evenly as possible, shuffled."""
    reps = list(values) * (n // len(values) + 1)
    out = reps[:n]
    return [out[i] for i in rng.permutation(n)]


def _study_task(task: dict) -> dict:
    """Worker: make, write and summarise one study."""
    study = make_study(task["seed"], size=task["size"], n_slices=task["n_slices"], fractures=task["fractures"],
                       uid=task["uid"])
    v = task["variant"]
    write_study(study, task["study_dir"], transfer_syntax=v["transfer_syntax"], head_first=v["head_first"],
                intercept=v["intercept"], bits_stored=v["bits_stored"], signed=v["signed"],
                modality=v["modality"])
    if task["segmentation"]:
        write_segmentation(study, task["seg_path"], head_first=v["head_first"])
    inst = study.instance_numbers(v["head_first"])
    boxes = [dict(StudyInstanceUID=study.uid, x=b["x"], y=b["y"], width=b["width"], height=b["height"],
                  slice_number=int(inst[b["slice_index"]])) for b in study.boxes]
    present = [n for n in LEVELS if (study.labels == LEVEL_LABELS[n]).any()]
    return dict(index=task["index"], split=task["split"], uid=study.uid, labels=study.label_row(), boxes=boxes,
                info=dict(StudyInstanceUID=study.uid, split=task["split"], slices=study.n_slices,
                          rows=study.hu.shape[1], columns=study.hu.shape[2], dz=study.spacing[0],
                          pixel_spacing=study.spacing[1], **v, segmentation=bool(task["segmentation"]),
                          levels=" ".join(present), seed=task["seed"]))


def _mp_context():
    # fork is fastest, but not once torch (and its thread pools) is loaded in this process
    if "torch" in sys.modules or "fork" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    return mp.get_context("fork")


def make_dataset(out_dir: str | os.PathLike, *, n_train: int = 60, n_test: int = 3, size: int = 128, seed: int = 0,
                 seg_share: float = 0.5, bbox_share: float = 0.5, workers: int | None = None,
                 test_csv_mismatch: bool = False, progress: bool = True, n_slices: int | None = None) -> dict:
    """Write an RSNA-format synthetic dataset.

    Layout (as the competition's): ``train.csv``, ``train_bounding_boxes.csv`` (for a ``bbox_share`` subset of
    the positive studies), ``test.csv``, ``sample_submission.csv``, ``train_images/<uid>/<n>.dcm``,
    ``test_images/<uid>/<n>.dcm``, ``segmentations/<uid>.nii`` (for a ``seg_share`` subset of the training
    studies). Besides, ``synthetic/studies.csv`` lists each study's header variant and geometry and
    ``synthetic/test_labels.csv`` holds the test studies' labels (not part of the competition layout).

    Across studies the headers vary deterministically (each value appears once n >= its count): transfer
    syntax (implicit, jpeg-lossless, explicit, rle), head-first / feet-first InstanceNumbers, the exact
    (intercept, signed, BitsStored) combinations of :data:`EXACT_ENCODINGS`, Modality present / absent.

    Args:
        test_csv_mismatch: list in test.csv / sample_submission.csv three studies that have no folder in
            test_images/ (the public competition's quirk) instead of the test folders' studies.
        workers: processes (default min(2, cpu count)); 0 or 1 runs in this process.
        n_slices: force every study's slice count (fast tests); default: drawn per study.

    Returns:
        A summary: counts, prevalence per target, slices written, seconds.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    for sub in ("train_images", "test_images", "segmentations", "synthetic"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2022]))
    n_all = n_train + n_test
    pool_ids = np.setdiff1d(np.arange(10000, 33000), [int(u.rsplit(".", 1)[1]) for u in PUBLIC_TEST_CSV_UIDS])
    uids = [f"{UID_PREFIX}{i}" for i in rng.choice(pool_ids, size=n_all, replace=False)]
    ts = _balanced(rng, list(DATASET_TRANSFER_SYNTAXES), n_all)
    hf = _balanced(rng, [True, False], n_all)
    enc = _balanced(rng, list(EXACT_ENCODINGS), n_all)
    mod = _balanced(rng, [False, True], n_all)
    fractures = [sample_fractures(rng) for _ in range(n_train)]
    seg_idx = set(rng.permutation(n_train)[: int(round(seg_share * n_train))].tolist())
    positive = [i for i in range(n_train) if any(fractures[i].values())]
    bbox_idx = set(rng.permutation(positive)[: int(round(bbox_share * len(positive)))].tolist()) if positive \
        else set()
    study_seeds = np.random.SeedSequence([int(seed), 7]).generate_state(n_all).tolist()

    tasks = []
    for i in range(n_all):
        split = "train" if i < n_train else "test"
        uid = uids[i]
        tasks.append(dict(
            index=i, split=split, uid=uid, seed=int(study_seeds[i]), size=size, n_slices=n_slices,
            fractures=fractures[i] if split == "train" else None,
            variant=dict(transfer_syntax=ts[i], head_first=hf[i], intercept=enc[i][0], signed=enc[i][1],
                         bits_stored=enc[i][2], modality=mod[i]),
            study_dir=str(out / f"{split}_images" / uid),
            segmentation=split == "train" and i in seg_idx,
            seg_path=str(out / "segmentations" / f"{uid}.nii"),
        ))

    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_all, desc="synthetic studies", unit="study")
    if workers <= 1 or n_all <= 1:
        for task in tasks:
            results.append(_study_task(task))
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, n_all), mp_context=_mp_context()) as pool:
            futures = [pool.submit(_study_task, t) for t in tasks]
            for fut in as_completed(futures):
                results.append(fut.result())
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r["index"])

    train_rows = [r["labels"] for r in results if r["split"] == "train"]
    train = pd.DataFrame(train_rows, columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE])
    train.to_csv(out / "train.csv", index=False)
    box_rows = [b for r in results if r["split"] == "train" and r["index"] in bbox_idx for b in r["boxes"]]
    boxes = pd.DataFrame(box_rows, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    boxes.to_csv(out / "train_bounding_boxes.csv", index=False)

    test_uids = [r["uid"] for r in results if r["split"] == "test"]
    listed = list(PUBLIC_TEST_CSV_UIDS) if test_csv_mismatch else test_uids
    test = pd.DataFrame([dict(row_id=f"{u}_{p}", StudyInstanceUID=u, prediction_type=p)
                         for u in listed for p in PREDICTION_TYPES],
                        columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test["row_id"], "fractured": 0.5}).to_csv(out / "sample_submission.csv", index=False)

    for split in ("train", "test"):
        stale = sorted({p.name for p in (out / f"{split}_images").iterdir()} - {r["uid"] for r in results
                                                                                if r["split"] == split})
        if stale:
            log.warning("%s/%s_images holds %d study folders from an earlier run (e.g. %s); they are not in the "
                        "new tables: write into an empty folder", out, split, len(stale), stale[0])
    info = pd.DataFrame([r["info"] for r in results])
    info.to_csv(out / "synthetic" / "studies.csv", index=False)
    pd.DataFrame([r["labels"] for r in results if r["split"] == "test"],
                 columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE]).to_csv(
        out / "synthetic" / "test_labels.csv", index=False)

    summary = dict(
        out_dir=str(out), n_train=n_train, n_test=n_test, size=size, seed=seed,
        n_segmentations=len(seg_idx), n_bbox_studies=len(bbox_idx), n_bbox_rows=len(boxes),
        n_slices=int(info["slices"].sum()) if len(info) else 0,
        prevalence={t: round(float(train[t].mean()), 4) if len(train) else 0.0
                    for t in ["patient_overall", *VERTEBRAE]},
        test_csv_mismatch=bool(test_csv_mismatch),
        seconds=round(time.perf_counter() - t0, 2),
    )
    (out / "synthetic" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
