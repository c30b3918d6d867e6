"""One synthetic study: :class:`SyntheticStudy` and :func:`make_study`.

The volume is built in readable steps (:func:`build_volume`): draw the anatomy, lay the grid along the spine,
paint soft tissue, discs, the other bones, the vertebrae (with their look-alikes and fractures), an implant;
then :func:`make_study` blurs, adds noise and quantises.

Every random choice comes from its own stream of the study's seed (labels, anatomy, fractures, bone texture,
noise, look-alikes), so a fracture changes nothing but its vertebra and the look-alikes never depend on the
labels. Fracture boxes come from what the fracture visibly changed: the vertebra is painted with and without
its fractures and every slice where at least two voxels differ by :data:`VISIBLE_HU` or more gets a box.

numpy / scipy only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..constants import UID_PREFIX, VERTEBRAE
from .anatomy import HU_RANGE, LEVELS, Anatomy, BonePlacement, bone_box, draw_anatomy, other_bones, paint_discs, \
    paint_soft_tissue, render_bone, vertebrae
from .fractures import (FRACTURE_KINDS, LOOKALIKE_KINDS, LOOKALIKE_SITES, Lesion, check_difficulty, plan_fracture,
                        plan_lookalike, sample_fracture_kind, sample_fractures, sample_lookalikes)
from .shapes import Grid, cap, ell, parts_box, solid_mask

log = logging.getLogger(__name__)

#: A fracture shows on a slice where at least two voxels changed by this many HU (before blur and noise).
VISIBLE_HU = 30.0

#: HU painted for metal before blurring (the stored value clips at HU_RANGE[1]).
METAL_HU = 3000.0


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
        fracture_sites: one dict per fracture: vertebra, kind (:data:`FRACTURE_KINDS`), site (body, arch,
            dens), subtlety (subtle, moderate, obvious), slices (indices of ``hu`` where it shows), voxels
            and contrast_hu (how many voxels it changed visibly, by how many HU on average, before blur and
            noise), and the kind's own numbers (gap_mm, shift_mm, fraction, height_loss).
        lookalikes: one dict per look-alike: kind (:data:`LOOKALIKE_KINDS`), vertebra ("all" for osteopenia),
            site, slices, detail.
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
    lookalikes: list[dict] = field(default_factory=list)
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

    def box_rows(self, head_first: bool = True) -> list[dict[str, Any]]:
        """This study's train_bounding_boxes.csv rows, slices named by InstanceNumber as written with
        `head_first`."""
        numbers = self.instance_numbers(head_first)
        return [{"StudyInstanceUID": self.uid, "x": b["x"], "y": b["y"], "width": b["width"], "height": b["height"],
                 "slice_number": int(numbers[b["slice_index"]])} for b in self.boxes]


# ---------------------------------------------------------------------------------------------------------
# Look-alike plan of a study
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LookalikePlan:
    """The look-alikes of one study: where the bone-level ones go, and the study-level ones."""

    on_bone: dict[str, list[str]] = field(default_factory=dict)  # vertebra -> kinds
    osteopenia: tuple[float, float] | None = None  # (cancellous, cortex) factors
    stop_in_c7: float | None = None  # fraction of C7's body height where the scan stops
    implant: str | None = None  # upper plated level

    @property
    def kinds(self) -> list[str]:
        kinds = [k for ks in self.on_bone.values() for k in ks]
        kinds += ["osteopenia"] * (self.osteopenia is not None) + ["truncated_c7"] * (self.stop_in_c7 is not None)
        kinds += ["metal_implant"] * (self.implant is not None)
        return sorted(kinds, key=LOOKALIKE_KINDS.index)


def plan_lookalikes(rng: np.random.Generator, difficulty: str,
                    forced: Sequence[str] | Mapping[str, str | None] | None) -> LookalikePlan:
    """Draw (or take) a study's look-alikes and where they go, all from the look-alike stream."""
    if forced is None:
        wanted = {kind: None for kind in sample_lookalikes(rng, difficulty)}
    else:
        wanted = dict(forced) if isinstance(forced, Mapping) else dict.fromkeys(forced)
        unknown = set(wanted) - set(LOOKALIKE_KINDS)
        if unknown:
            raise ValueError(f"unknown look-alikes {sorted(unknown)}; choose among {LOOKALIKE_KINDS}")
    plan = LookalikePlan()
    for kind in LOOKALIKE_KINDS:
        if kind not in wanted:
            continue
        if kind == "osteopenia":
            plan.osteopenia = (float(rng.uniform(0.45, 0.65)), float(rng.uniform(0.7, 0.85)))
        elif kind == "truncated_c7":
            plan.stop_in_c7 = float(rng.uniform(0.3, 0.75))
        else:
            sites = LOOKALIKE_SITES[kind]
            vertebra = str(sites[int(rng.integers(len(sites)))])
            if wanted[kind] is not None:
                if wanted[kind] not in sites:
                    raise ValueError(f"look-alike {kind} cannot go on {wanted[kind]!r}; choose among {sites}")
                vertebra = str(wanted[kind])
            if kind == "metal_implant":
                plan.implant = vertebra
            else:
                plan.on_bone.setdefault(vertebra, []).append(kind)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Painting one bone with its lesions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BoneTone:
    """HU of cancellous and cortical bone, and where each bone's texture comes from."""

    cancellous: float
    cortex: float
    streams: Any  # iterator of SeedSequence, one per bone in painting order


class BonePainter:
    """Paints one bone, possibly several times (without and with its lesions) on the same texture."""

    def __init__(self, hu: np.ndarray, grid: Grid, bone: BonePlacement, tone: BoneTone, extra_parts=(),
                 once: bool = False):
        """``once``: the bone is painted a single time, so its texture is drawn for its core only (faster)."""
        self.grid, self.bone, self.tone = grid, bone, tone
        self._shaped: dict[tuple, tuple] = {}  # shaping lesions -> (solid, painted box, cancellous core)
        rng = np.random.default_rng(next(tone.streams))
        self.outer = bone_box(grid, bone, list(extra_parts))
        if self.outer is None:
            return
        shape = tuple(s.stop - s.start for s in self.outer)
        self.texture = rng if once else rng.standard_normal(shape, dtype=np.float32) * np.float32(55.0)
        self.base = hu[self.outer].copy()
        self._uvw = None

    @property
    def uvw(self):
        """Local (u, v, w) mm of the box's voxels (computed once, when a lesion needs them)."""
        if self._uvw is None:
            self._uvw = self.grid.local(*self.outer, top=self.bone.top, tilt=self.bone.tilt)
        return self._uvw

    def render(self, lesions: Sequence[Lesion] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The painted box (float32) and the solid (bool) with ``lesions`` applied."""
        shaping = [les for les in lesions if les.warps or les.cuts or les.parts()]
        key = tuple(id(les) for les in shaping)
        if key not in self._shaped:  # the bone's shape changes only with these lesions: paint it once for them
            parts = [*self.bone.parts, *(p for les in shaping for p in les.parts())]
            solid = solid_mask(self.grid, parts, self.bone.top, self.bone.tilt, self.outer, shaping)
            grid = self.grid
            self._shaped[key] = (solid, *render_bone(self.base, solid, self.texture, self.tone.cancellous,
                                                     self.tone.cortex, (grid.dz, grid.dy, grid.dx)))
        solid, view, inner = self._shaped[key]
        view = view.copy()
        for les in lesions:
            les.paint(view, *self.uvw, solid, inner)
        return view, solid

    def commit(self, hu: np.ndarray, labels: np.ndarray, view: np.ndarray, solid: np.ndarray) -> None:
        hu[self.outer] = view
        if self.bone.label:
            labels[self.outer][solid] = self.bone.label


def _slices_of(mask: np.ndarray, z0: int, min_voxels: int = 1) -> list[int]:
    counts = mask.sum(axis=(1, 2))
    return [int(z0 + i) for i in np.nonzero(counts >= min_voxels)[0]]


def _boxes_of(mask: np.ndarray, outer, px: float, shape: tuple[int, int, int], vertebra: str) -> list[dict]:
    """One box per slice of ``mask`` (a box-relative bool) with >= 2 voxels, with a margin of
    max(2 px, 3 mm)."""
    Z, H, W = shape
    boxes = []
    margin = max(2.0, 3.0 / px)
    for zi in range(mask.shape[0]):
        m = mask[zi]
        if m.sum() < 2:
            continue
        rows, cols = np.nonzero(m)
        rr0, rr1 = rows.min() + outer[1].start, rows.max() + outer[1].start
        cc0, cc1 = cols.min() + outer[2].start, cols.max() + outer[2].start
        x0, y0 = max(cc0 - margin, 0.0), max(rr0 - margin, 0.0)
        x1, y1 = min(cc1 + 1 + margin, float(W)), min(rr1 + 1 + margin, float(H))
        boxes.append(dict(x=round(float(x0), 2), y=round(float(y0), 2), width=round(float(x1 - x0), 2),
                          height=round(float(y1 - y0), 2), slice_index=int(zi + outer[0].start), vertebra=vertebra))
    return boxes


def _visible(delta: np.ndarray) -> np.ndarray:
    """Voxels of a box that changed visibly (by :data:`VISIBLE_HU` or more)."""
    return delta >= VISIBLE_HU


def _add_fractures(frac_rng, painter: BonePainter, looks: list[Lesion], view: np.ndarray, solid: np.ndarray,
                   anat: Anatomy, difficulty: str, forced_kind: str | None):
    """Draw and paint the fractures of one fractured vertebra (1, or 2 one time in five), one after the other.

    Each fracture must change at least two voxels of some slice visibly, else it is redrawn (up to 12 times).

    Returns:
        The fractures, what each changed (|HU difference| against the painting before it, box-relative), and
        the final painting and solid.
    """
    bone = painter.bone
    name, d = bone.name, bone.extra["d"]
    plans: list[Lesion] = []
    deltas: list[np.ndarray] = []
    for _ in range(2 if frac_rng.random() < 0.2 else 1):
        taken = tuple(p.kind for p in plans if p.kind == "compression")
        kind = forced_kind or sample_fracture_kind(frac_rng, name, difficulty, exclude=taken)
        if kind == "compression" and taken:  # one crushed endplate per vertebra
            kind = "cleft"
        for _attempt in range(12):
            plan = plan_fracture(frac_rng, kind, name, anat.k, d, anat.px, bone.extra)
            new_view, new_solid = painter.render([*looks, *plans, plan])
            delta = np.abs(new_view - view)
            if _visible(delta).sum(axis=(1, 2)).max(initial=0) >= 2:
                break
        else:
            log.warning("synthetic %s fracture (%s) shows on no slice of a %s volume (%.2f mm slices): its label "
                        "stays 1 but it gets no box; use more slices or pixels", name, kind,
                        (anat.Z, anat.size, anat.size), anat.dz)
        plans.append(plan)
        deltas.append(delta)
        view, solid = new_view, new_solid
    return plans, deltas, view, solid


def _no_compression(name: str) -> str:
    raise ValueError(f"a compression fracture needs a vertebral body that C1 and C2 lack in the model; "
                     f"{name} can take {[k for k in FRACTURE_KINDS if k != 'compression']}")


def _record(lesion: Lesion, vertebra: str, slices: list[int], extra: dict) -> dict:
    return dict(vertebra=vertebra, kind=lesion.kind, site=lesion.site, slices=slices, **extra)


def paint_vertebra(hu, labels, grid, anat, bone: BonePlacement, tone: BoneTone, *, fractured: bool,
                   difficulty: str, frac_rng, look_rng, look_kinds: Sequence[str], forced_kind: str | None
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """Paint one vertebra with its look-alikes and fractures.

    The vertebra is rendered several times on the same texture: bare (only to locate its look-alikes), with
    its look-alikes, then adding one fracture at a time; what each fracture changed by :data:`VISIBLE_HU` or
    more gives its boxes.

    Returns:
        boxes, fracture records, look-alike records (see :class:`SyntheticStudy`).
    """
    looks = [plan_lookalike(look_rng, kind, bone.name, anat.k, bone.extra["d"], anat.px, bone.extra)
             for kind in look_kinds]
    painter = BonePainter(hu, grid, bone, tone, [p for les in looks for p in les.parts()])
    if painter.outer is None:
        return [], [], []
    u, v, w = painter.uvw
    z0 = painter.outer[0].start
    with_looks, solid = painter.render(looks)
    look_records = []
    if looks:
        bare, _ = painter.render()
        changed = np.abs(with_looks - bare) >= VISIBLE_HU
        for les in looks:
            shown = _slices_of(changed & les.reach(u, v, w), z0)
            look_records.append(_record(les, bone.name, shown, dict(detail=les.detail)))
    if not fractured:
        painter.commit(hu, labels, with_looks, solid)
        return [], [], look_records
    plans, deltas, final, final_solid = _add_fractures(frac_rng, painter, looks, with_looks, solid, anat, difficulty,
                                                       forced_kind)
    painter.commit(hu, labels, final, final_solid)
    boxes, records = [], []
    for les, delta in zip(plans, deltas):
        mine = _visible(delta)
        own_boxes = _boxes_of(mine, painter.outer, anat.px, hu.shape, bone.name)
        boxes += own_boxes
        records.append(_record(les, bone.name, [b["slice_index"] for b in own_boxes],
                               dict(subtlety=les.subtlety, voxels=int(mine.sum()),
                                    contrast_hu=round(float(delta[mine].mean()), 1) if mine.any() else 0.0,
                                    **les.describe())))
    return boxes, records, look_records


# ---------------------------------------------------------------------------------------------------------
# Implant
# ---------------------------------------------------------------------------------------------------------


def paint_implant(hu: np.ndarray, grid: Grid, anat: Anatomy, upper: str, rng: np.random.Generator) -> dict:
    """An anterior cervical plate over ``upper`` and the level below, two screws into each body, and the
    streaks metal throws across its slices. Labels are unchanged (the plate is not bone)."""
    lower = LEVELS[LEVELS.index(upper) + 1]
    du, dl = anat.levels[upper], anat.levels[lower]
    bd, top, tilt = du["bd"], du["top"], anat.dpath(du["top"] + du["bh"])
    half_width = rng.uniform(6.0, 8.0)
    parts = [ell((-bd / 2 - 1.6, 0.0), (0.9, half_width), 0.3 * du["bh"], dl["top"] - top + 0.7 * dl["bh"])]
    for d in (du, dl):
        w_mid = d["top"] - top + 0.5 * d["bh"]
        r = rng.uniform(1.4, 1.8)
        depth = rng.uniform(0.1, 0.35) * d["bd"]
        for side in (1.0, -1.0):
            v0 = side * rng.uniform(2.5, 4.0)
            parts.append(cap((-d["bd"] / 2 - 1.6, v0), (depth, v0 * 1.2), r, w_mid - r, w_mid + r, q=2))
    outer = parts_box(grid, parts, top, tilt)
    if outer is None:
        return dict(kind="metal_implant", vertebra=upper, site="anterior plate", slices=[],
                    detail=f"{upper}-{lower} anterior plate")
    metal = np.zeros(hu.shape, bool)
    metal[outer] = solid_mask(grid, parts, top, tilt, outer)
    amplitude, rays, decay = rng.uniform(250.0, 600.0), int(rng.integers(5, 10)), rng.uniform(20.0, 40.0)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.meshgrid(grid.y, grid.x, indexing="ij")
    per_slice = metal.sum(axis=(1, 2))
    slices = [int(z) for z in np.nonzero(per_slice)[0]]
    for z in slices:
        rows, cols = np.nonzero(metal[z])
        cy, cx = rows.mean() * grid.dy, cols.mean() * grid.dx
        phi = np.arctan2(yy - cy, xx - cx)
        r = np.hypot(yy - cy, xx - cx)
        s = np.sin(rays * phi + phase + 0.05 * z)
        strength = math.sqrt(per_slice[z] / per_slice.max())
        streak = amplitude * strength * np.sign(s) * np.abs(s) ** 8 * np.exp(-r / decay)
        hu[z] += streak.astype(np.float32)
        hu[z][metal[z]] = METAL_HU
    return dict(kind="metal_implant", vertebra=upper, site="anterior plate", slices=slices,
                detail=f"{upper}-{lower} anterior plate")


# ---------------------------------------------------------------------------------------------------------
# The volume
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """What :func:`build_volume` returns: the HU and label volumes before blur and noise, and the truth."""

    hu: np.ndarray
    labels: np.ndarray
    anatomy: Anatomy
    grid: Grid
    boxes: list[dict]
    fracture_sites: list[dict]
    lookalikes: list[dict]


def build_volume(anat_rng: np.random.Generator, size: int, n_slices: int | None, fractures: dict[str, int],
                 frac_rng: np.random.Generator, tex_seed: np.random.SeedSequence, look_rng: np.random.Generator,
                 difficulty: str = "realistic", fracture_kinds: Mapping[str, str] | None = None,
                 lookalikes: Sequence[str] | Mapping[str, str | None] | None = None) -> Volume:
    """Paint one study (HU before blur and noise, labels, boxes and the answers), step by step."""
    look = plan_lookalikes(look_rng, difficulty, lookalikes)
    anat = draw_anatomy(anat_rng, size, n_slices, stop_in_c7=look.stop_in_c7)
    grid = anat.grid()
    hu = np.full((anat.Z, anat.size, anat.size), -1000.0, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    paint_soft_tissue(hu, grid, anat)
    paint_discs(hu, grid, anat)

    canc, cort = anat.cancellous, anat.cortex
    if look.osteopenia is not None:
        canc, cort = canc * look.osteopenia[0], cort * look.osteopenia[1]
    tone = BoneTone(canc, cort, iter(tex_seed.spawn(64)))
    for bone in other_bones(anat, grid):
        painter = BonePainter(hu, grid, bone, tone, once=True)  # never fractured
        if painter.outer is not None:
            painter.commit(hu, labels, *painter.render())

    boxes, sites, look_records = [], [], []
    forced = dict(fracture_kinds or {})
    for bone in vertebrae(anat):
        b, f, lk = paint_vertebra(hu, labels, grid, anat, bone, tone, fractured=bool(fractures.get(bone.name)),
                                  difficulty=difficulty, frac_rng=frac_rng, look_rng=look_rng,
                                  look_kinds=look.on_bone.get(bone.name, []), forced_kind=forced.get(bone.name))
        boxes += b
        sites += f
        look_records += lk
    if look.implant is not None:
        look_records.append(paint_implant(hu, grid, anat, look.implant, look_rng))
    if look.osteopenia is not None:
        look_records.append(dict(kind="osteopenia", vertebra="all", site="", slices=list(range(anat.Z)),
                                 detail=f"cancellous x{look.osteopenia[0]:.2f}, cortex x{look.osteopenia[1]:.2f}"))
    if look.stop_in_c7 is not None:
        body = grid.zslice(anat.levels["C7"]["top"], np.inf)  # from the top of C7's body to the last slice
        look_records.append(dict(kind="truncated_c7", vertebra="C7", site="", slices=list(range(*body.indices(anat.Z))),
                                 detail=f"scan ends {look.stop_in_c7:.0%} down the body of C7"))
    look_records.sort(key=lambda r: (LOOKALIKE_KINDS.index(r["kind"]), r["vertebra"]))
    return Volume(hu, labels, anat, grid, boxes, sites, look_records)


def _meta(anat: Anatomy, difficulty: str) -> dict:
    levels = anat.levels
    return dict(scale=round(anat.k, 4), fov_mm=round(anat.fov, 3), lordosis_mm=round(anat.lordosis, 3), dz=anat.dz,
                s_top=round(anat.s_top, 3), s_bottom=round(anat.s_bot, 3), bone_density=round(float(anat.density), 3),
                table=bool(anat.table), difficulty=difficulty,
                levels={n: dict(top=round(float(levels[n]["top"]), 3), bottom=round(float(levels[n]["bottom"]), 3))
                        for n in LEVELS})


def make_study(seed: int, *, size: int = 128, n_slices: int | None = None, fractures: dict[str, int] | None = None,
               uid: str | None = None, noise_hu: float | None = None, difficulty: str = "realistic",
               fracture_kinds: Mapping[str, str] | None = None,
               lookalikes: Sequence[str] | Mapping[str, str | None] | None = None) -> SyntheticStudy:
    """Build one synthetic study.

    Args:
        seed: everything (anatomy, geometry, labels, look-alikes, noise) follows from it; the same seed with
            other ``fractures`` has the same anatomy, look-alikes and texture.
        size: rows = columns. The in-plane field of view is 120-160 mm whatever the size, so the pixel spacing
            is fov / size (~1 mm at 128, ~0.27 mm at 512).
        n_slices: force the slice count; the covered anatomy stays the drawn one and the slice spacing becomes
            extent / (n_slices - 1). Default: spacing drawn from 0.5-1.0 mm (~190-400 slices).
        fractures: C1..C7 -> 0/1 (missing keys = 0); default: drawn with :func:`sample_fractures`.
        uid: StudyInstanceUID; default ``UID_PREFIX + <number from seed>``.
        noise_hu: scanner noise sigma; default drawn from 15-25 HU.
        difficulty: "realistic" (fracture kinds from :data:`KIND_MIX`, look-alikes from :data:`LOOKALIKE_MIX`)
            or "easy" (clefts only, no look-alikes).
        fracture_kinds: force the kind of a fractured vertebra's fractures, e.g. ``{"C5": "hairline"}``.
        lookalikes: force the look-alikes instead of drawing them: kinds (their vertebrae drawn) or
            kind -> vertebra (None: drawn); ``[]`` for none.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    check_difficulty(difficulty)
    streams = np.random.SeedSequence(int(seed)).spawn(6)  # labels, anatomy, fractures, texture, noise, look-alikes
    if fractures is None:
        drawn = sample_fractures(np.random.default_rng(streams[0]))
    else:
        unknown = set(fractures) - set(VERTEBRAE)
        if unknown:
            raise ValueError(f"fractures: unknown vertebrae {sorted(unknown)}; expected keys among {VERTEBRAE}")
        drawn = {v: int(bool(fractures.get(v, 0))) for v in VERTEBRAE}
    for vertebra, kind in (fracture_kinds or {}).items():
        if vertebra not in VERTEBRAE or kind not in FRACTURE_KINDS:
            raise ValueError(f"fracture_kinds: {vertebra!r} -> {kind!r}; expected C1..C7 -> one of {FRACTURE_KINDS}")
        if kind == "compression" and vertebra in ("C1", "C2"):
            _no_compression(vertebra)
    if uid is None:
        uid = f"{UID_PREFIX}{10000 + int(seed) % 89999}"
    if not uid.startswith(UID_PREFIX):
        raise ValueError(f"uid {uid!r} must start with {UID_PREFIX!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    rng = np.random.default_rng(streams[1])
    vol = build_volume(rng, size, n_slices, drawn, np.random.default_rng(streams[2]), streams[3],
                       np.random.default_rng(streams[5]), difficulty, fracture_kinds, lookalikes)

    # partial-volume blur, scanner noise, quantisation
    hu = ndimage.gaussian_filter(vol.hu, (0.5, 0.6, 0.6), truncate=2.5)
    sigma_n = float(rng.uniform(15.0, 25.0)) if noise_hu is None else float(noise_hu)
    hu += np.random.default_rng(streams[4]).standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma_n)
    np.clip(hu, HU_RANGE[0], HU_RANGE[1], out=hu)
    hu = np.rint(hu).astype(np.int16)

    # patient position (LPS mm) of voxel (0, 0, 0); table coordinates like a scanner's
    px = vol.anatomy.px
    x0 = round(float(-px * (size - 1) / 2 + rng.uniform(-20, 20)), 3)
    y0 = round(float(-px * (size - 1) / 2 + rng.uniform(-30, 30)), 3)
    z0 = round(float(rng.uniform(-180.0, 40.0)), 3)
    meta = _meta(vol.anatomy, difficulty)
    meta["noise_hu"] = round(sigma_n, 3)
    meta["lookalikes"] = [r["kind"] for r in vol.lookalikes]
    return SyntheticStudy(uid=uid, hu=hu, labels=vol.labels, fractures=drawn, boxes=vol.boxes,
                          spacing=(float(vol.anatomy.dz), float(px), float(px)), origin=(x0, y0, z0), seed=int(seed),
                          fracture_sites=vol.fracture_sites, lookalikes=vol.lookalikes, meta=meta)
