"""Fracture labels, fractures of graded subtlety, and the normal findings and old injuries that look like them.

Labels: :func:`sample_fractures` draws C1..C7 with the competition's statistics. Images: every fracture and
every look-alike is a *lesion* acting on one bone in its level's local frame (``u`` posterior +, ``v`` patient
left +, ``w`` caudal + from the level's top, mm). A lesion may

* ``warp`` coordinates (a displaced fragment, the step of a healed fracture),
* ``cut`` bone away (a crushed endplate),
* ``paint`` HU values inside the bone (a gap, a partial-volume line, a sclerotic band, a vascular channel),
* add ``parts`` (an osteophyte).

Fracture kinds (:data:`FRACTURE_KINDS`):

========================  ================================================================================
hairline                  a crack thinner than a voxel: the voxels it crosses lose a fraction (20-50 %) of
                          their bone density by partial volume, a few tens of HU in cancellous bone
cleft                     a 1-2 mm gap filled with haematoma (55 HU), little or no displacement
displaced                 a 1-2.5 mm gap whose far fragment is shifted 1.5-3.5 mm
compression               the anterior body loses 15-45 % of its height (a wedge), with a band of
                          condensed trabeculae under the depressed endplate (C3-C7)
========================  ================================================================================

Look-alikes (:data:`LOOKALIKE_KINDS`), drawn independently of the labels: vascular channels (basivertebral
vein, nutrient foramina), osteophytes, endplate sclerosis, osteopenic bone, a healed old fracture, an anterior
plate with screws and metal streaks, and a scan that stops part-way through C7.

numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np

from ..constants import TRAIN_PREVALENCE, VERTEBRAE
from .anatomy import GAP_HU
from .shapes import Part, cap

#: The difficulty settings of :func:`kit.synthetic.make_study` / :func:`kit.synthetic.make_dataset`.
DIFFICULTIES = ("easy", "realistic")

#: Fracture kinds, from the most to the least subtle.
FRACTURE_KINDS = ("hairline", "cleft", "displaced", "compression")

#: Probability of each fracture kind in the realistic mix, per vertebra group. C1 and C2 have no
#: compressible body in the model (C1 has none, C2's carries the dens), so their share goes to clefts.
KIND_MIX = {
    "C3-C7": {"hairline": 0.35, "cleft": 0.25, "displaced": 0.20, "compression": 0.20},
    "C1-C2": {"hairline": 0.35, "cleft": 0.40, "displaced": 0.25, "compression": 0.0},
}

#: Look-alike kinds and the probability that a realistic study has each (independently of its labels and of
#: each other): about 46 % of studies have at least one.
LOOKALIKE_MIX = {
    "vascular_channel": 0.15,
    "osteophyte": 0.12,
    "endplate_sclerosis": 0.08,
    "osteopenia": 0.08,
    "healed_fracture": 0.06,
    "metal_implant": 0.03,
    "truncated_c7": 0.04,
}
LOOKALIKE_KINDS = tuple(LOOKALIKE_MIX)

# Fractured vertebrae per study in the 2019 training studies (RSNA_DATA.md).
_FRACTURE_COUNTS = {0: 1058, 1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


def check_difficulty(difficulty: str) -> str:
    """``difficulty`` if valid, else a ValueError naming the choices."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {DIFFICULTIES}")
    return difficulty


# ---------------------------------------------------------------------------------------------------------
# Labels
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


def sample_fracture_kind(rng: np.random.Generator, vertebra: str, difficulty: str = "realistic",
                         exclude: tuple[str, ...] = ()) -> str:
    """Draw the kind of one fracture of ``vertebra`` from :data:`KIND_MIX` ("cleft" only when easy; draws
    nothing from ``rng`` then)."""
    if check_difficulty(difficulty) == "easy":
        return "cleft"
    mix = dict(KIND_MIX["C1-C2" if vertebra in ("C1", "C2") else "C3-C7"])
    for kind in exclude:
        mix[kind] = 0.0
    kinds = [k for k in FRACTURE_KINDS if mix[k] > 0]
    p = np.array([mix[k] for k in kinds])
    return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]


def sample_lookalikes(rng: np.random.Generator, difficulty: str = "realistic") -> list[str]:
    """Draw the look-alike kinds of one study from :data:`LOOKALIKE_MIX` (none when easy)."""
    if check_difficulty(difficulty) == "easy":
        return []
    draws = rng.random(len(LOOKALIKE_KINDS))
    return [kind for kind, u in zip(LOOKALIKE_KINDS, draws) if u < LOOKALIKE_MIX[kind]]


# ---------------------------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Lesion:
    """Something that changes one bone: a fracture or a look-alike (see the module docstring)."""

    kind: str
    site: str = ""  # body, arch, dens, endplate ...
    warps = False
    cuts = False

    def warp(self, u, v, w):
        """Where each voxel's bone comes from (a displaced fragment): local coordinates in, moved ones out."""
        return u, v, w

    def cut(self, u, v, w) -> np.ndarray:
        """Bone removed (a crushed endplate), for lesions with ``cuts``."""
        raise NotImplementedError

    def paint(self, view, u, v, w, solid, inner) -> None:
        """Change HU values of the painted bone box ``view`` in place."""

    def reach(self, u, v, w) -> np.ndarray | bool:
        """Voxels a look-alike may change (to tell apart the look-alikes of one bone)."""
        return True

    def parts(self) -> list[Part]:
        return []

    @property
    def subtlety(self) -> str:
        return ""

    @property
    def detail(self) -> str:
        """A look-alike's size and density in words (for the answers)."""
        return self.site

    def describe(self) -> dict:
        return {}


@dataclass
class Plane(Lesion):
    """A lesion along the plane n.(p - p0) = 0, within ``radius`` of (pu, pv) in-plane and w in [wa, wb]."""

    pu: float = 0.0
    pv: float = 0.0
    pw: float = 0.0
    n: tuple[float, float, float] = (1.0, 0.0, 0.0)
    wa: float = 0.0
    wb: float = 0.0
    radius: float = 0.0

    def signed(self, u, v, w):
        return self.n[0] * (u - self.pu) + self.n[1] * (v - self.pv) + self.n[2] * (w - self.pw)

    def region(self, u, v, w, grow: float = 0.0):
        return ((w >= self.wa - grow) & (w <= self.wb + grow)
                & ((u - self.pu) ** 2 + (v - self.pv) ** 2 <= (self.radius + grow) ** 2))

    def reach(self, u, v, w):
        return self.region(u, v, w, grow=2.0)


@dataclass
class Shifted(Plane):
    """A plane lesion whose positive side (within its region) is shifted by (du, dv) mm in-plane."""

    du: float = 0.0
    dv: float = 0.0

    @property
    def warps(self) -> bool:  # type: ignore[override]
        return bool(self.du or self.dv)

    def warp(self, u, v, w):
        side = self.region(u, v, w) & (self.signed(u, v, w) > 0)
        return np.where(side, u - self.du, u), np.where(side, v - self.dv, v), w


@dataclass
class Cleft(Shifted):
    """A gap of ``gap`` mm filled with haematoma, its far side shifted (kinds "cleft" and "displaced")."""

    gap: float = 1.0

    def paint(self, view, u, v, w, solid, inner):
        view[solid & self.region(u, v, w) & (np.abs(self.signed(u, v, w)) <= self.gap / 2)] = GAP_HU

    @property
    def subtlety(self) -> str:
        return "obvious" if self.kind == "displaced" else "moderate"

    def describe(self) -> dict:
        return dict(gap_mm=round(self.gap, 2), shift_mm=round(math.hypot(self.du, self.dv), 2))


@dataclass
class Hairline(Plane):
    """A crack thinner than a voxel: voxels within half a pixel of the plane lose up to ``fraction`` of
    their value towards the gap's (partial volume)."""

    fraction: float = 0.3
    half_width: float = 0.5  # mm: half a pixel

    def weight(self, u, v, w, solid):
        d = np.abs(self.signed(u, v, w))
        wgt = np.float32(self.fraction) * np.clip(1 - d / np.float32(self.half_width), 0, 1)
        return np.where(solid & self.region(u, v, w), wgt, np.float32(0))

    def paint(self, view, u, v, w, solid, inner):
        wgt = self.weight(u, v, w, solid)
        view -= wgt * (view - np.float32(GAP_HU))

    @property
    def subtlety(self) -> str:
        return "subtle"

    def describe(self) -> dict:
        return dict(gap_mm=0.0, shift_mm=0.0, fraction=round(self.fraction, 3))


@dataclass
class Compression(Lesion):
    """A wedge compression of the body: the superior endplate sinks by ``loss`` mm anteriorly (0 at the
    posterior wall), with a band of condensed trabeculae ``band`` mm thick, ``band_hu`` denser, under it."""

    bd: float = 16.0
    bw: float = 20.0
    bh: float = 13.0
    loss: float = 3.0
    band: float = 2.5
    band_hu: float = 250.0
    cuts = True

    def depth(self, u):
        return np.float32(self.loss) * np.clip((np.float32(self.bd / 2) - u) / np.float32(self.bd), 0, 1)

    def footprint(self, u, v):
        return (u / (self.bd / 2 + 1.5)) ** 2 + (v / (self.bw / 2 + 1.5)) ** 2 <= 1

    def cut(self, u, v, w):
        return self.footprint(u, v) & (w < self.depth(u))

    def paint(self, view, u, v, w, solid, inner):
        d = self.depth(u)
        band = inner & self.footprint(u, v) & (w >= d) & (w <= d + np.float32(self.band)) & (d > 0.3)
        view[band] += np.float32(self.band_hu)

    @property
    def subtlety(self) -> str:
        return "moderate" if self.loss < 0.25 * self.bh else "obvious"

    def describe(self) -> dict:
        return dict(gap_mm=0.0, shift_mm=0.0, height_loss=round(self.loss / self.bh, 3))


@dataclass
class DenseLine(Shifted):
    """A healed old fracture: a sclerotic line ``thick`` mm wide, ``extra_hu`` denser, with a small step."""

    thick: float = 2.0
    extra_hu: float = 400.0

    def paint(self, view, u, v, w, solid, inner):
        view[solid & self.region(u, v, w) & (np.abs(self.signed(u, v, w)) <= self.thick / 2)] += self.extra_hu

    @property
    def detail(self) -> str:
        return (f"{self.site}: +{self.extra_hu:.0f} HU line {self.thick:.1f} mm wide, "
                f"{math.hypot(self.du, self.dv):.1f} mm step")


@dataclass
class Channel(Lesion):
    """Vascular channels: capsules (a, b, radius) through the bone at w in [wa, wb], filled with ``hu``."""

    segments: list = field(default_factory=list)
    wa: float = 0.0
    wb: float = 0.0
    hu: float = 70.0

    def mask(self, u, v, w):
        zone = (w >= self.wa) & (w <= self.wb)
        m = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v), np.shape(w)), bool)
        for (u0, v0), (u1, v1), r in self.segments:
            du, dv = u1 - u0, v1 - v0
            t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0, 1)
            m |= (u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2 <= r * r
        return m & zone

    def paint(self, view, u, v, w, solid, inner):
        view[solid & self.mask(u, v, w)] = self.hu

    def reach(self, u, v, w):
        return self.mask(u, v, w)

    @property
    def detail(self) -> str:
        return f"{self.site}: {2 * self.segments[0][2]:.1f} mm wide, {self.hu:.0f} HU"


@dataclass
class Sclerosis(Lesion):
    """Endplate sclerosis: the cancellous bone within ``thick`` mm of an endplate of the body, denser."""

    bd: float = 16.0
    bw: float = 20.0
    w0: float = 0.0
    w1: float = 3.0
    extra_hu: float = 350.0

    def zone(self, u, v, w):
        return ((u / (self.bd / 2)) ** 2 + (v / (self.bw / 2)) ** 2 <= 1) & (w >= self.w0) & (w <= self.w1)

    def paint(self, view, u, v, w, solid, inner):
        view[inner & self.zone(u, v, w)] += np.float32(self.extra_hu)

    def reach(self, u, v, w):
        return self.zone(u, v, w)

    @property
    def detail(self) -> str:
        return f"{self.site}: +{self.extra_hu:.0f} HU over {self.w1 - self.w0:.1f} mm"


@dataclass
class Osteophyte(Lesion):
    """A bony beak growing from the anterior rim of an endplate into the disc space."""

    beak: list = field(default_factory=list)

    def parts(self) -> list[Part]:
        return list(self.beak)

    @property
    def detail(self) -> str:
        (a, b) = self.beak[0].g["a"], self.beak[0].g["b"]
        return f"{self.site}: {math.hypot(b[0] - a[0], b[1] - a[1]):.1f} mm beak"


# ---------------------------------------------------------------------------------------------------------
# Planning fractures
# ---------------------------------------------------------------------------------------------------------


def plan_cleft(rng: np.random.Generator, name: str, k: float, d: dict, px: float, extra: dict) -> Cleft:
    """Draw one cleft for vertebra ``name`` (local frame of its level): the generator's original fracture,
    a 1-2 mm gap in the body, the arch or the dens with at most a pixel or so of displacement."""
    gap = max(rng.uniform(1.0, 2.0), 1.25 * px)
    if name == "C1":
        site = "arch"
    elif name == "C2":
        site = str(rng.choice(["dens", "body", "arch"], p=[0.35, 0.3, 0.35]))
    else:
        site = str(rng.choice(["body", "arch"], p=[0.55, 0.45]))
    if site == "dens":
        dens_u, dens_tip = extra["dens_u"], extra["dens_tip"]
        pw = rng.uniform(-4.0, -1.0) * k
        tilt = rng.normal(0, 0.15, 2)
        n = np.array([tilt[0], tilt[1], 1.0])
        n /= np.linalg.norm(n)
        ang = rng.uniform(0, 2 * np.pi)
        shift = rng.uniform(0.3, 1.6) * px
        # the part above the plane is the displaced fragment: flip the normal so "positive" is above
        return Cleft("cleft", "dens", dens_u, 0.0, pw, tuple(-n), dens_tip - 1.0, pw + gap, 5.0 * k + 1.5,
                     du=shift * math.cos(ang), dv=shift * math.sin(ang), gap=gap)
    if site == "body":
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
        return Cleft("cleft", "body", pu, pv, (wa + wb) / 2, tuple(n), wa, wb, max(bw, bd) / 2 + 1.0,
                     du=shift * n[0], dv=shift * n[1], gap=gap)
    bars = extra["bars"]  # arch: a cleft across one of the posterior/lateral bars
    a, b, r, w0, w1 = bars[int(rng.integers(len(bars)))]
    t = rng.uniform(0.3, 0.7)
    pu, pv = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    ang = math.atan2(b[1] - a[1], b[0] - a[0]) + rng.normal(0, 0.3)
    n = (math.cos(ang), math.sin(ang), 0.0)
    return Cleft("cleft", "arch", pu, pv, (w0 + w1) / 2, n, w0 - 2.0, w1 + 2.0, r + 2.5 * k, gap=gap)


def plan_fracture(rng: np.random.Generator, kind: str, name: str, k: float, d: dict, px: float,
                  extra: dict) -> Lesion:
    """Draw one fracture of ``kind`` for vertebra ``name`` (its level's frame; ``d`` its dims, ``px`` the pixel
    spacing, ``extra`` the arch bars and dens position)."""
    if kind == "compression":
        bh = d["bh"]
        return Compression("compression", "body", bd=d["bd"], bw=d["bw"], bh=bh, loss=rng.uniform(0.15, 0.45) * bh,
                           band=rng.uniform(2.0, 3.5), band_hu=rng.uniform(150.0, 300.0))
    base = plan_cleft(rng, name, k, d, px, extra)
    if kind == "cleft":
        return base
    plane = dict(site=base.site, pu=base.pu, pv=base.pv, pw=base.pw, n=base.n, wa=base.wa, wb=base.wb,
                 radius=base.radius)
    if kind == "hairline":
        return Hairline("hairline", fraction=rng.uniform(0.2, 0.5), half_width=0.5 * px, **plane)
    if kind == "displaced":
        shift = rng.uniform(1.5, 3.5)
        if base.site == "body":
            direction = math.atan2(base.n[1], base.n[0]) + rng.normal(0, 0.4)
        else:
            direction = rng.uniform(0, 2 * np.pi)
        plane["radius"] = base.radius + (shift if base.site == "arch" else 0.0)
        return Cleft("displaced", gap=rng.uniform(1.0, 2.5), du=shift * math.cos(direction),
                     dv=shift * math.sin(direction), **plane)
    raise ValueError(f"unknown fracture kind {kind!r}; choose one of {FRACTURE_KINDS}")


# ---------------------------------------------------------------------------------------------------------
# Planning look-alikes
# ---------------------------------------------------------------------------------------------------------

#: The vertebrae each bone-level look-alike may land on.
LOOKALIKE_SITES = {
    "vascular_channel": ("C2", "C3", "C4", "C5", "C6", "C7"),
    "osteophyte": ("C3", "C4", "C5", "C6", "C7"),
    "endplate_sclerosis": ("C3", "C4", "C5", "C6", "C7"),
    "healed_fracture": VERTEBRAE,
    "metal_implant": ("C3", "C4", "C5", "C6"),  # the upper of the two plated levels
}


def plan_lookalike(rng: np.random.Generator, kind: str, name: str, k: float, d: dict, px: float,
                   extra: dict) -> Lesion:
    """Draw one bone-level look-alike of ``kind`` on vertebra ``name`` (its level's frame)."""
    bd, bw, bh = d.get("bd", 16.0), d.get("bw", 20.0), d["bh"]
    if kind == "vascular_channel":
        r = max(rng.uniform(0.5, 0.8), 0.45 * px)
        wc, length = rng.uniform(0.4, 0.6) * bh, rng.uniform(2.0, 5.0)
        if rng.random() < 0.7:  # basivertebral vein: a Y from the back of the body towards its centre
            split = rng.uniform(0.0, 0.2) * bd
            tip_u, spread = -rng.uniform(0.05, 0.25) * bd, rng.uniform(0.12, 0.25) * bw
            segments = [((bd / 2 + 1.0, 0.0), (split, 0.0), r),
                        ((split, 0.0), (tip_u, spread), 0.8 * r), ((split, 0.0), (tip_u, -spread), 0.8 * r)]
            site = "basivertebral"
        else:  # a nutrient foramen: a thin channel from the anterolateral cortex inwards
            ang = rng.uniform(0.6, 1.2) * rng.choice([-1.0, 1.0])
            start = (-bd / 2 * math.cos(ang) - 1.0, bw / 2 * math.sin(ang) + math.copysign(1.0, ang))
            depth = rng.uniform(0.3, 0.5)
            segments = [(start, (start[0] * (1 - depth), start[1] * (1 - depth)), 0.8 * r)]
            site = "nutrient_foramen"
        return Channel(kind, site, segments=segments, wa=wc - length / 2, wb=wc + length / 2,
                       hu=rng.uniform(40.0, 90.0))
    if kind == "osteophyte":
        upper = rng.random() < 0.5
        length, r = rng.uniform(2.0, 5.0) * k, rng.uniform(1.2, 2.0) * k
        v0 = rng.uniform(-0.3, 0.3) * bw
        w_edge = 0.0 if upper else bh
        slope = 0.4 if upper else -0.4  # the beak bends towards the disc: cranially at the top, caudally below
        root = (-bd / 2 + 1.5 * k, v0)
        tip = (-bd / 2 - length, v0 + rng.uniform(-2.0, 2.0))
        beak = [cap(root, tip, r, w_edge - 1.5 * r, w_edge + 1.5 * r, slope=slope, uref=root[0], q=3)]
        return Osteophyte(kind, "superior endplate" if upper else "inferior endplate", beak=beak)
    if kind == "endplate_sclerosis":
        thick = rng.uniform(2.0, 4.0)
        upper = rng.random() < 0.5
        w0, w1 = (0.0, thick) if upper else (bh - thick, bh)
        return Sclerosis(kind, "superior endplate" if upper else "inferior endplate", bd=bd, bw=bw, w0=w0, w1=w1,
                         extra_hu=rng.uniform(250.0, 500.0))
    if kind == "healed_fracture":
        base = plan_cleft(rng, name, k, d, px, extra)
        step = rng.uniform(0.3, 0.8)
        ang = rng.uniform(0, 2 * np.pi)
        return DenseLine(kind, base.site, base.pu, base.pv, base.pw, base.n, base.wa, base.wb, base.radius,
                         thick=rng.uniform(1.5, 3.0), extra_hu=rng.uniform(300.0, 600.0),
                         du=step * math.cos(ang), dv=step * math.sin(ang))
    raise ValueError(f"{kind!r} is not a bone-level look-alike; choose one of {sorted(LOOKALIKE_SITES)}")
