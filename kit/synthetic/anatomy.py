"""The synthetic neck: drawn proportions and geometry, soft tissue, discs and bones.

Anatomy (mm, HU): C1 ring with lateral masses and transverse foramina, C2 with the dens rising into the
ring, C3-C7 with bodies, pedicles, articular pillars (oblique facet joints), laminae and bifid spinous
processes, C7's long spinous process, T1-T2 with rib heads, discs, spinal canal and cord; occiput,
mandible, hyoid, airway, thyroid, lung apices, clavicles, neck soft tissue and an optional table. Each
study varies size, lordosis, rotation, position, field of view, slice spacing and bone density.

:func:`draw_anatomy` draws every number of one study from its anatomy stream, in a fixed order (so a
fracture or a look-alike never moves the anatomy); the ``paint_*`` functions write it into the HU volume.

numpy / scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..constants import SEG_LABELS, THORACIC_LABELS, VERTEBRAE
from .shapes import Box, Grid, Part, cap, ell, mirror, parts_box, ring, solid_mask

#: Every HU value the generator produces lies in this range, which every exact header combination of
#: :func:`kit.synthetic.write_study` represents (12-bit unsigned with intercept -1024 goes up to 3071,
#: 12-bit signed with intercept 0 up to 2047).
HU_RANGE = (-1024, 2047)

#: Levels the generator builds, head to feet, and their label values in the segmentation volume.
LEVELS = (*VERTEBRAE, "T1", "T2")
LEVEL_LABELS = {**SEG_LABELS, "T1": THORACIC_LABELS["T1"], "T2": THORACIC_LABELS["T2"]}

#: HU of a fracture gap (haematoma / soft tissue).
GAP_HU = 55.0

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
# The drawn numbers of one study
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Anatomy:
    """Everything drawn about one study's neck (mm unless said; ``s`` is mm below the top of C1, caudal +)."""

    k: float  # body size factor
    fov: float  # in-plane field of view
    px: float  # pixel spacing
    size: int
    levels: dict  # level -> dims (bw, bd, bh, ...) and top / bottom (s)
    dens_u: float  # AP position of the dens
    dens_tip: float  # s of the dens tip
    s_top: float  # s of the first slice
    s_bot: float  # s of the last slice
    dz: float
    Z: int
    lordosis: float
    col_y0: float
    col_x0: float
    lat: float
    rot0: float
    rot1: float
    tissue: dict  # neck outline parameters
    hu_muscle: float
    hu_fat: float
    density: float  # bone mineral density factor
    cancellous: float  # HU of cancellous bone
    cortex: float  # HU of cortical bone
    s_apex: float  # lung apex
    table: bool
    table_y: float
    hu_lung: float

    @property
    def length(self) -> float:
        """s of the bottom of C7 (the lordotic curve spans the top of C1 to here)."""
        return self.levels["C7"]["bottom"]

    def path(self, s):
        """Image (y, x) mm of the column centre at ``s``: lordosis in the neck, kyphosis below, lateral drift."""
        s = np.asarray(s, float)
        L = self.length
        slope_t = self.lordosis * math.pi / L
        y = np.where(s <= L, -self.lordosis * np.sin(np.pi * np.clip(s, 0, L) / L), slope_t * (s - L))
        return self.col_y0 + y, self.col_x0 + self.lat * s + 1.5 * np.sin(s / 40.0)

    def dpath(self, s: float) -> float:
        """dy/ds of the column at ``s`` (the endplate tilt)."""
        L = self.length
        return float(-self.lordosis * np.pi / L * np.cos(np.pi * s / L)) if s <= L else self.lordosis * math.pi / L

    def grid(self) -> Grid:
        """The volume's sampling along the drawn spine path."""
        s_all = self.s_top + self.dz * np.arange(self.Z)
        yc, xc = self.path(s_all)
        theta = self.rot0 + self.rot1 * np.sin(np.pi * s_all / self.length)
        return Grid((self.Z, self.size, self.size), (self.dz, self.px, self.px), self.s_top, yc, xc, theta)


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


def draw_anatomy(rng: np.random.Generator, size: int, n_slices: int | None,
                 stop_in_c7: float | None = None) -> Anatomy:
    """Draw one study's neck, in the fixed order that keeps every seed's anatomy stable.

    Args:
        rng: the study's anatomy stream.
        n_slices: force the slice count (the spacing follows); None draws the spacing.
        stop_in_c7: end the scan this fraction of the way down C7's body (a look-alike: the label stays);
            None keeps the drawn end (below T1, or between C7 and T1).
    """
    k = float(rng.uniform(0.88, 1.12))
    fov = float(rng.uniform(120.0, 160.0))
    levels = _layout(rng, k)
    h1 = levels["C1"]["bh"]
    dens_tip = rng.uniform(0.5, 2.5) * k  # mm below the top of C1
    s_top = float(rng.uniform(0.25, 0.45) * h1 if rng.random() < 0.12 else rng.uniform(-14.0, -4.0))
    if rng.random() < 0.15:  # stops above T1
        s_bot = float(rng.uniform(levels["C7"]["bottom"] + 0.5, levels["T1"]["top"] - 0.5))
    else:
        s_bot = float(rng.uniform(levels["T1"]["bottom"] - 2.0, levels["T2"]["bottom"] - 1.0))
    if stop_in_c7 is not None:
        s_bot = float(levels["C7"]["top"] + stop_in_c7 * levels["C7"]["bh"])
    if n_slices is None:
        dz = float(rng.choice([0.5, 0.625, 0.7, 0.75, 0.8, 1.0]))
        Z = int(round((s_bot - s_top) / dz)) + 1
    else:
        if n_slices < 2:
            raise ValueError(f"n_slices must be >= 2, got {n_slices}")
        Z = int(n_slices)
        dz = round((s_bot - s_top) / (Z - 1), 4)
    lordosis = float(rng.uniform(0.0, 11.0) * k)
    col_y0 = fov / 2 + rng.uniform(-6.0, 10.0)  # body centre of C1..C2 a bit posterior of the FOV centre
    col_x0 = fov / 2 + rng.uniform(-8.0, 8.0)
    lat = rng.uniform(-0.06, 0.06)
    rot0, rot1 = rng.uniform(-0.12, 0.12), rng.uniform(-0.06, 0.06)
    tissue = dict(
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
    density = rng.uniform(0.7, 1.1)
    cortex = rng.uniform(1100, 1450) * (0.85 + 0.15 * density)
    anat = Anatomy(k=k, fov=fov, px=round(fov / size, 6), size=int(size), levels=levels, dens_u=-2.0 * k,
                   dens_tip=dens_tip, s_top=s_top, s_bot=s_bot, dz=dz, Z=Z, lordosis=lordosis, col_y0=col_y0,
                   col_x0=col_x0, lat=lat, rot0=rot0, rot1=rot1, tissue=tissue, hu_muscle=hu_muscle,
                   hu_fat=hu_fat, density=density, cancellous=300.0 * density, cortex=cortex, s_apex=0.0,
                   table=False, table_y=0.0, hu_lung=0.0)
    anat.s_apex = levels["T1"]["top"] + rng.uniform(-2.0, 6.0)
    anat.table = bool(rng.random() < 0.6)
    yc, _ = anat.path(s_top + dz * np.arange(Z))
    anat.table_y = float((yc + tissue["neck_ry_post"] + tissue["neck_cu"]).max()) + rng.uniform(3.0, 12.0)
    anat.hu_lung = rng.uniform(-870, -820)
    return anat


# ---------------------------------------------------------------------------------------------------------
# Soft tissue
# ---------------------------------------------------------------------------------------------------------


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


def airway_profiles(anat: Anatomy, s_all: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice (Z,) profiles interpolated from the level positions: body / canal depth, canal width and the
    airway's AP position and radii."""
    levels, k = anat.levels, anat.k
    mids = np.array([levels[n]["top"] + levels[n]["bh"] / 2 for n in LEVELS[1:]])
    bd = np.interp(s_all, mids, [levels[n]["bd"] for n in LEVELS[1:]])
    cd = np.interp(s_all, mids, [levels[n]["cd"] for n in LEVELS[1:]])
    cw = np.interp(s_all, mids, [levels[n]["cw"] for n in LEVELS[1:]])
    knots = np.array([-20.0, levels["C3"]["top"], levels["C4"]["top"], levels["C5"]["top"], levels["C6"]["top"],
                      400.0])
    ary = np.interp(s_all, knots, np.array([7.0, 6.5, 7.0, 8.0, 8.0, 8.5]) * k)
    arx = np.interp(s_all, knots, np.array([16.0, 15.0, 11.0, 8.0, 8.5, 9.5]) * k)
    prevert = np.interp(s_all, knots, np.array([4.0, 4.0, 5.0, 7.0, 13.0, 14.0]) * k)
    return dict(bd=bd, cd=cd, cw=cw, au=-(bd / 2 + prevert + ary), arx=arx, ary=ary)


def paint_soft_tissue(hu: np.ndarray, grid: Grid, anat: Anatomy, chunk: int = 32) -> None:
    """Table, neck outline (fat over muscle), canal and cord, airway, cartilage, thyroid and lung apices."""
    f32, k, a = np.float32, anat.k, anat.tissue
    levels = anat.levels
    lt = {n: (levels[n]["top"], levels[n]["bottom"]) for n in LEVELS[1:]}
    zones = dict(  # s ranges of the structures that exist only at some levels
        larynx=(lt["C4"][0] - 2.0, lt["C6"][0]), trachea=(lt["C6"][0], np.inf),
        thyroid=(lt["C6"][0] + 2.0, lt["T1"][1]), lung=(anat.s_apex, np.inf))
    prof = {name: arr.astype(f32)[:, None, None] for name, arr in airway_profiles(anat, grid.s).items()}
    Z, H, W = hu.shape
    for z0 in range(0, Z, chunk):
        zs = slice(z0, min(z0 + chunk, Z))
        u, v, _ = grid.local(zs, slice(0, H), slice(0, W))
        s = grid.s[zs].astype(f32)[:, None, None]
        rho, rho_in = _body_outline(u, v, s, a)
        inside, core = rho <= 1, rho_in <= 1
        view = hu[zs]
        if anat.table:  # a curved carbon-fibre table top, straight in image coordinates
            yy = grid.y[None, :, None]
            y_top = anat.table_y - 0.004 * (grid.x[None, None, :] - anat.fov / 2) ** 2
            view[np.broadcast_to((yy >= y_top) & (yy <= y_top + 4.0), view.shape)] = 180.0
        view[inside] = anat.hu_fat
        view[core] = anat.hu_muscle
        av = np.abs(v)
        bdp, cdp, cwp = prof["bd"][zs], prof["cd"][zs], prof["cw"][zs]
        cu_ = bdp / 2 + cdp / 2
        view[((u - cu_) / (cdp / 2)) ** 2 + (v / (cwp / 2)) ** 2 <= 1] = 18.0  # CSF
        view[((u - cu_) / (cdp / 4.2)) ** 2 + (v / (cwp / 4.8)) ** 2 <= 1] = 36.0  # cord
        au, arx, ary = prof["au"][zs], prof["arx"][zs], prof["ary"][zs]
        dua = u - au
        for zone in ("thyroid", "larynx", "trachea", "lung"):
            lo, hi = zones[zone]
            sel = slice(int(np.searchsorted(grid.s[zs], lo)), int(np.searchsorted(grid.s[zs], hi)))
            if sel.stop <= sel.start:
                continue
            uu, vv, rx_, ry_, du2 = u[sel], av[sel], arx[sel], ary[sel], dua[sel]
            if zone == "thyroid":
                m = (((du2 - f32(2.0 * k)) / f32(8.0 * k)) ** 2 + ((vv - rx_ - f32(8.0 * k)) / f32(7.0 * k)) ** 2
                     <= 1)
                view[sel][m & core[sel]] = 85.0
            elif zone == "larynx":
                m = np.abs((du2 / (ry_ + f32(3.0 * k))) ** 2 + (vv / (rx_ + f32(3.0 * k))) ** 2 - 1) < 0.2
                view[sel][m & (du2 < f32(2.0 * k))] = 160.0
            elif zone == "trachea":
                m = np.abs((du2 / (ry_ + f32(1.5 * k))) ** 2 + (vv / (rx_ + f32(1.5 * k))) ** 2 - 1) < 0.25
                view[sel][m & (du2 < 0.5 * ry_)] = 110.0
            else:
                r_l = np.minimum(32.0 * k, 4.5 * np.sqrt(np.clip(grid.s[zs][sel] - anat.s_apex, 0, None))) + 1e-3
                r_l = r_l.astype(f32)[:, None, None]
                lung_v = f32(levels["T1"]["bw"] / 2 + 12.0 * k) + r_l
                m = ((uu - f32(2.0 * k)) / (r_l * f32(1.15))) ** 2 + ((vv - lung_v) / r_l) ** 2 <= 1
                view[sel][m & core[sel]] = anat.hu_lung
        air = (dua / ary) ** 2 + (v / arx) ** 2 <= 1
        view[air & inside] = -990.0


def paint_discs(hu: np.ndarray, grid: Grid, anat: Anatomy) -> None:
    """Intervertebral discs (annulus and nucleus, label 0) between the bodies of C2..T2."""
    levels = anat.levels
    for upper, lower in zip(LEVELS[1:-1], LEVELS[2:]):
        du_, dl = levels[upper], levels[lower]
        bd, bw = (du_["bd"] + dl["bd"]) / 2, (du_["bw"] + dl["bw"]) / 2
        top, tilt = dl["top"], anat.dpath(dl["top"] - dl["disc"] / 2)
        for parts, value in (([ell((0.0, 0.0), (bd / 2, bw / 2), -dl["disc"] - 0.6, 0.6, p=2.3)], 95.0),
                             ([ell((0.5, 0.0), (bd / 3.4, bw / 3.4), -dl["disc"] + 0.8, -0.8)], 70.0)):
            outer = parts_box(grid, parts, top, tilt)
            if outer is not None:
                hu[outer][solid_mask(grid, parts, top, tilt, outer)] = value


# ---------------------------------------------------------------------------------------------------------
# Bones
# ---------------------------------------------------------------------------------------------------------


def c1_ring(k: float, dens_u: float, c2: dict) -> tuple[float, float, float]:
    """Centre and inner / outer AP radii of the atlas ring: its anterior arch 1.8 mm in front of the dens
    (radius 5 mm), its posterior arch behind the canal of C2."""
    front = dens_u - 5.0 * k - 1.8 * k
    ri_u = (c2["bd"] / 2 + c2["cd"] - front) / 2
    return front + ri_u, ri_u, ri_u + 5.0 * k


def _c1_parts(k: float, h1: float, dens_u: float, c2: dict) -> list[Part]:
    c1u, ri_u, ro_u = c1_ring(k, dens_u, c2)
    ri_v, ro_v = 14.0 * k, 19.5 * k
    lm_u, lm_v = dens_u + 1.5 * k, 15.5 * k
    parts = [
        ring((c1u, 0.0), (ri_u, ri_v), (ro_u, ro_v), 0.2 * h1, 0.8 * h1, q=6),  # anterior + posterior arch
        ell((c1u - ro_u + 1.0 * k, 0.0), (3.0 * k, 5.0 * k), 0.15 * h1, 0.85 * h1, q=4),  # anterior tubercle
        ell((c1u + ro_u - 1.0 * k, 0.0), (3.0 * k, 6.0 * k), 0.25 * h1, 0.9 * h1, q=4),  # posterior tubercle
    ]
    parts += mirror(lambda sd: ell((lm_u, sd * lm_v), (8.5 * k, 6.0 * k), 0.0, h1, q=8))  # lateral masses
    parts += mirror(lambda sd: cap((dens_u + 1.0 * k, sd * 19.0 * k), (dens_u + 2.5 * k, sd * 36.0 * k),
                                   3.5 * k, 0.3 * h1, 0.75 * h1, q=4))  # transverse processes
    parts += mirror(lambda sd: ell((dens_u + 2.0 * k, sd * 26.0 * k), (2.6 * k, 2.6 * k), -5, h1 + 5,
                                   neg=True))  # foramina transversaria
    return parts


def _c2_parts(k: float, d: dict, dens_u: float, dens_tip: float, joint_below: float) -> list[Part]:
    bw, bd, bh, cw, cd = d["bw"], d["bd"], d["bh"], d["cw"], d["cd"]
    pc = bd / 2 + cd  # posterior edge of the canal (midline)
    parts = [
        ell((0.0, 0.0), (bd / 2, bw / 2), 0.0, bh, p=2.4, q=10),  # body
        ell((dens_u, 0.0), (5.0 * k, 5.0 * k), dens_tip, 4.0 * k, q=2.5),  # dens
        cap((pc - 1.0 * k, 0.0), (pc + d["sl"], 0.0), 3.2 * k, 0.45 * bh, 0.95 * bh, slope=d["ss"], uref=pc,
            q=4),  # spinous process
    ]
    parts += mirror(lambda sd: ell((0.5 * k, sd * (bw / 2 + 2.5 * k)), (8.0 * k, 5.5 * k), 0.0,
                                   0.4 * bh, q=8))  # superior articular facets
    parts += mirror(lambda sd: cap((bd / 2 - 2.0 * k, sd * (bw / 2 - 1.5 * k)),
                                   (bd / 2 + 6.0 * k, sd * (cw / 2 + 3.0 * k)), 3.2 * k, 0.1 * bh, 0.6 * bh,
                                   q=6))  # pedicles / pars
    parts += mirror(lambda sd: ell((bd / 2 + 7.0 * k, sd * (cw / 2 + 4.5 * k)), (6.0 * k, 5.0 * k),
                                   0.35 * bh, joint_below - 0.9 * k, slope=0.8, uref=bd / 2 + 7.0 * k,
                                   q=6))  # inferior articular processes
    parts += mirror(lambda sd: cap((bd / 2 + 9.0 * k, sd * (cw / 2 + 2.5 * k)), (pc + 1.0 * k, 0.0),
                                   2.6 * k, 0.3 * bh, 0.95 * bh, slope=0.3, uref=bd / 2 + 9.0 * k,
                                   q=6))  # laminae
    parts += mirror(lambda sd: cap((pc + d["sl"] - 4.0 * k, 0.0), (pc + d["sl"] + 1.0 * k, sd * 5.0 * k),
                                   2.6 * k, 0.45 * bh, 0.95 * bh, slope=d["ss"], uref=pc, q=4))  # bifid tip
    parts += mirror(lambda sd: ring((0.0, sd * (bw / 2 + 3.0 * k)), (2.2 * k, 2.2 * k), (4.0 * k, 4.0 * k),
                                    0.2 * bh, 0.55 * bh, q=4))  # transverse processes with foramina
    return parts


def _sub_parts(k: float, name: str, d: dict, joint_above: float, joint_below: float) -> list[Part]:
    """C3..T2 (offsets in the level's own frame: w = 0 at its superior endplate)."""
    bw, bd, bh, cw, cd, sl, ss = d["bw"], d["bd"], d["bh"], d["cw"], d["cd"], d["sl"], d["ss"]
    thoracic = name.startswith("T")
    pc = bd / 2 + cd
    lm_u, lm_v = bd / 2 + (5.0 if not thoracic else 4.0) * k, cw / 2 + (5.0 if not thoracic else 4.0) * k
    lm_r = (6.0 * k, 5.0 * k) if not thoracic else (5.0 * k, 4.5 * k)
    spin_r = (2.4 if name in ("C3", "C4", "C5", "C6") else 3.0) * k
    parts = [
        ell((0.0, 0.0), (bd / 2, bw / 2), 0.0, bh, p=2.4 if not thoracic else 2.1, q=10),  # body
        cap((pc - 1.0 * k, 0.0), (pc + sl, 0.0), spin_r, 0.25 * bh, 0.85 * bh, slope=ss, uref=pc, q=4),
    ]
    if not thoracic:  # uncinate processes: lips rising from the lateral edges of the superior endplate
        parts += mirror(lambda sd: ell((0.0, sd * (bw / 2 - 1.2 * k)), (5.0 * k, 1.6 * k), -2.0 * k,
                                       0.3 * bh, q=2))
    parts += mirror(lambda sd: cap((bd / 2 - 3.0 * k, sd * (bw / 2 - 3.0 * k)),
                                   (bd / 2 + 4.0 * k, sd * (cw / 2 + 2.0 * k)),
                                   (2.6 if not thoracic else 3.2) * k, 0.12 * bh, 0.62 * bh, q=6))  # pedicles
    parts += mirror(lambda sd: ell((lm_u, sd * lm_v), lm_r, joint_above + 0.9 * k, joint_below - 0.9 * k,
                                   slope=0.9, uref=lm_u, q=6))  # articular pillars between facet joints
    parts += mirror(lambda sd: cap((lm_u + 3.0 * k, sd * (cw / 2 + 2.5 * k)), (pc + 1.0 * k, 0.0),
                                   (1.9 if not thoracic else 2.5) * k, 0.2 * bh, bh + 0.3 * d["disc"],
                                   slope=0.6 * ss, uref=lm_u + 3.0 * k, q=6))  # laminae
    if d["bifid"]:
        parts += mirror(lambda sd: cap((pc + sl - 4.0 * k, 0.0), (pc + sl + 1.0 * k, sd * 3.5 * k),
                                       2.0 * k, 0.25 * bh, 0.85 * bh, slope=ss, uref=pc, q=4))
    if d["foramen"]:  # transverse process ring around the foramen transversarium + tubercles
        fu, fv = 0.5 * k, bw / 2 + 3.8 * k
        parts += mirror(lambda sd: ring((fu, sd * fv), (2.3 * k, 2.3 * k), (4.3 * k, 4.3 * k), 0.3 * bh,
                                        0.8 * bh, q=4))
        parts += mirror(lambda sd: cap((fu, sd * (fv + 3.5 * k)), (fu - 1.0 * k, sd * d["tpr"]), 2.4 * k,
                                       0.35 * bh, 0.75 * bh, q=4))
    elif not thoracic:  # C7: long transverse process without a foramen
        parts += mirror(lambda sd: cap((bd / 2 + 2.0 * k, sd * (cw / 2 + 2.0 * k)),
                                       (bd / 2 - 1.0 * k, sd * d["tpr"]), 3.0 * k, 0.3 * bh, 0.75 * bh, q=4))
    else:  # T1/T2: posterolateral transverse processes
        tu = bd / 2 + 0.6 * cd
        parts += mirror(lambda sd: cap((tu, sd * (cw / 2 + 4.0 * k)), (tu + 7.0 * k, sd * d["tpr"]),
                                       3.8 * k, 0.05 * bh, 0.6 * bh, slope=0.3, uref=tu, q=4))
    return parts


def _rib_parts(k: float, d: dict) -> list[Part]:
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
            parts.append(cap(a, b, (3.2 if i == 0 else 3.6) * k, w, w + 10.0 * k, slope=slope, uref=a[0], q=4))
            w += drop
    return parts


@dataclass
class BonePlacement:
    """One bone to paint: its parts in the local frame placed at ``top`` (s, mm) with endplate ``tilt``."""

    name: str  # a level (C1..T2) or a non-vertebral bone ("occiput", "ribs T1" ...)
    parts: list[Part]
    top: float
    tilt: float
    label: int = 0
    extra: dict | None = None  # for vertebrae: what fracture planning needs (dens, arch bars, C1 ring)


def other_bones(anat: Anatomy, grid: Grid) -> list[BonePlacement]:
    """Occiput, mandible, hyoid, clavicles with the manubrium, and the ribs of T1 and T2 (label 0)."""
    k, dens_u, levels = anat.k, anat.dens_u, anat.levels
    c2 = levels["C2"]
    c1u = c1_ring(k, dens_u, c2)[0]
    occ = [
        ell((dens_u + 2.0 * k, 15.0 * k), (8.0 * k, 5.5 * k), -12.0 * k, -1.8 * k, q=3),  # occipital condyles
        ell((dens_u + 2.0 * k, -15.0 * k), (8.0 * k, 5.5 * k), -12.0 * k, -1.8 * k, q=3),
        # rim of the foramen magnum, then the occipital bone widening upwards behind it
        ring((c1u + 1.0 * k, 0.0), (18.0 * k, 16.0 * k), (25.0 * k, 22.0 * k), -12.0 * k, -6.5 * k,
             umin=c1u - 12.0 * k),
        ring((c1u + 2.0 * k, 0.0), (24.0 * k, 24.0 * k), (31.0 * k, 30.0 * k), -19.0 * k, -11.5 * k,
             umin=c1u - 8.0 * k),
        ring((c1u + 4.0 * k, 0.0), (32.0 * k, 38.0 * k), (38.0 * k, 44.0 * k), -45.0, -18.5 * k,
             umin=c1u - 4.0 * k),
        ell((c1u - 27.0 * k, 0.0), (10.0 * k, 12.0 * k), -40.0, -6.0 * k, slope=0.8,
            uref=c1u - 27.0 * k),  # clivus
        ell((c1u + 2.0 * k, 44.0 * k), (10.0 * k, 8.0 * k), -40.0, -3.0 * k, q=3),  # mastoids
        ell((c1u + 2.0 * k, -44.0 * k), (10.0 * k, 8.0 * k), -40.0, -3.0 * k, q=3),
    ]
    bones = [BonePlacement("occiput", occ, 0.0, anat.dpath(0.0))]
    s_mand = c2["top"] - 4.0 * k
    mand_c = dens_u - 30.0 * k
    bones.append(BonePlacement("mandible", [ring((mand_c, 0.0), (21.0 * k, 33.0 * k), (27.0 * k, 39.0 * k), 0.0,
                                                 levels["C3"]["top"] + 2.0 - s_mand, umax=mand_c + 12.0 * k, q=6)],
                               s_mand, 0.0))
    hy_top = levels["C3"]["top"] + 0.5 * levels["C3"]["bh"]
    prof = airway_profiles(anat, grid.s)
    i_hy = int(np.argmin(np.abs(grid.s - hy_top)))
    hy_c = float(prof["au"][i_hy] - prof["ary"][i_hy]) - 9.0 * k
    bones.append(BonePlacement("hyoid", [ring((hy_c + 8.0 * k, 0.0), (10.0 * k, 15.0 * k), (13.0 * k, 19.0 * k),
                                              0.0, 4.0 * k, umax=hy_c + 14.0 * k, q=4)], hy_top, 0.0))
    clav = mirror(lambda sd: cap((-48.0 * k, sd * 22.0 * k), (-22.0 * k, sd * 85.0 * k), 5.0 * k, 0.0, 12.0 * k,
                                 q=3))
    clav.append(ell((-55.0 * k, 0.0), (6.0 * k, 24.0 * k), 9.0 * k, 60.0))  # manubrium
    bones.append(BonePlacement("clavicles", clav, levels["T1"]["top"] + 4.0 * k, 0.0))
    for name in ("T1", "T2"):
        d = levels[name]
        bones.append(BonePlacement(f"ribs {name}", _rib_parts(k, d), d["top"], anat.dpath(d["top"])))
    return bones


def arch_bars(name: str, k: float, d: dict, c1: dict) -> list[tuple]:
    """Bars (a, b, radius, w0, w1) an arch fracture may cross, in the level's frame."""
    if name == "C1":
        c1u, ri_u, ro_u, h1 = c1["c1u"], c1["ri_u"], c1["ro_u"], c1["h1"]
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


def vertebrae(anat: Anatomy) -> list[BonePlacement]:
    """C1..T2, each in its own frame (w = 0 at its top), with what fracture planning needs in ``extra``:
    the body dims ``d``, the arch ``bars``, the dens position (C2)."""
    k, dens_u, levels = anat.k, anat.dens_u, anat.levels
    c1, c2 = levels["C1"], levels["C2"]
    joints = {name: levels[name]["top"] - 0.35 * levels[name]["disc"] for name in LEVELS[2:]}  # facet joints
    joints["T3"] = levels["T2"]["bottom"] + 2.0
    c1u, ri_u, ro_u = c1_ring(k, dens_u, c2)
    ring_c1 = dict(c1u=c1u, ri_u=ri_u, ro_u=ro_u, h1=c1["bh"])
    out = []
    for i, name in enumerate(LEVELS):
        d = levels[name]
        top = d["top"]
        extra = dict(d=d, bars=arch_bars(name, k, d, ring_c1))
        if name == "C1":
            parts = _c1_parts(k, c1["bh"], dens_u, c2)
        elif name == "C2":
            parts = _c2_parts(k, d, dens_u, anat.dens_tip - top, joints[LEVELS[i + 1]] - top)
            extra.update(dens_u=dens_u, dens_tip=anat.dens_tip - top)
        else:
            nxt = LEVELS[i + 1] if i + 1 < len(LEVELS) else "T3"
            parts = _sub_parts(k, name, d, joints[name] - top, joints[nxt] - top)
        out.append(BonePlacement(name, parts, top, anat.dpath(top + d["bh"] / 2), LEVEL_LABELS[name], extra))
    return out


def render_bone(base: np.ndarray, solid: np.ndarray, texture: np.ndarray | np.random.Generator, cancellous: float,
                cortex: float,
                spacing: tuple[float, float, float], t_mm: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Paint a bone into a copy of ``base``: a cortical shell ``t_mm`` thick over a textured cancellous core.

    Args:
        base: (z, y, x) HU of the bone's box before it is painted.
        solid: (z, y, x) bool, the bone.
        texture: (z, y, x) float32 HU added to the cancellous value (the same for every painting of a bone),
            or a generator to draw it for the core's voxels only (a bone painted once).
        spacing: (dz, dy, dx) mm.

    Returns:
        The painted box (float32) and its cancellous core (bool).
    """
    dz, dy, dx = spacing
    ry, rx, rz = (max(1, int(round(t_mm / s))) for s in (dy, dx, dz))
    inner = ndimage.minimum_filter(solid.view(np.uint8), size=(2 * rz + 1, 2 * ry + 1, 2 * rx + 1),
                                   mode="nearest").astype(bool)
    view = base.copy()
    if isinstance(texture, np.random.Generator):
        view[inner] = cancellous + texture.standard_normal(int(inner.sum()), dtype=np.float32) * np.float32(55.0)
    else:
        view[inner] = cancellous + texture[inner]
    view[solid & ~inner] = cortex
    return view, inner


def bone_box(grid: Grid, bone: BonePlacement, extra_parts: list[Part] = ()) -> Box | None:
    """Index box of a bone and any parts a look-alike adds to it."""
    return parts_box(grid, [*bone.parts, *extra_parts], bone.top, bone.tilt)
