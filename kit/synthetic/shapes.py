"""Shape primitives of the synthetic anatomy: solid parts in a vertebra's local frame and the volume grid.

A bone is a list of :class:`Part` objects (superellipses, capsules, rings swept along the spine's axis) in
the local frame of its level: ``u`` posterior +, ``v`` patient left +, ``w`` caudal + from the level's top,
all in mm. :class:`Grid` maps that frame onto voxel indices along the curved, rotated column;
:func:`solid_mask` rasterises a list of parts, optionally bent by lesions (a displaced fragment, a crushed
endplate) from :mod:`kit.synthetic.fractures`.

numpy only.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

Box = tuple[slice, slice, slice]


class Part:
    """One solid piece: an in-plane shape swept over a local z range (mm, caudal positive).

    kind "ell": superellipse centred (cu, cv), radii (ru, rv), exponent p.
    kind "cap": capsule around the segment (u0, v0)-(u1, v1), radius r.
    kind "ring": elliptical annulus centred (cu, cv), inner radii (riu, riv), outer (ru, rv); only u in
    [umin, umax].
    The z range [w0, w1] moves by ``slope * (u - uref)`` (posterior parts sloping caudally); ``q`` rounds
    its ends (in-plane size shrinks as sqrt(1 - |t|^q) with t the normalised z position; None = flat).
    ``neg`` parts are holes (foramina) cut out of the union of the others.
    """

    __slots__ = ("kind", "g", "w0", "w1", "slope", "uref", "q", "neg", "boxes")

    def __init__(self, kind, g, w0, w1, slope=0.0, uref=0.0, q=None, neg=False):
        self.kind, self.g, self.w0, self.w1 = kind, g, float(w0), float(w1)
        self.slope, self.uref, self.q, self.neg = float(slope), float(uref), q, neg
        self.boxes: dict = {}  # (grid id, top, tilt) -> index box, filled by Grid.part_box

    def bounds(self) -> tuple[float, float, float]:
        """In-plane bounding circle (cu, cv, R)."""
        g = self.g
        if self.kind == "cap":
            (u0, v0), (u1, v1), r = g["a"], g["b"], g["r"]
            return (u0 + u1) / 2, (v0 + v1) / 2, math.hypot(u1 - u0, v1 - v0) / 2 + r
        return g["c"][0], g["c"][1], max(g["r"][0], g["r"][1])

    def mask(self, u, v, w) -> np.ndarray:
        """Boolean mask of the part at local coordinates (arrays broadcasting together)."""
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


def ell(c, r, w0, w1, p=2.0, **kw) -> Part:
    """A superellipse part (see :class:`Part`)."""
    return Part("ell", {"c": c, "r": r, "p": p}, w0, w1, **kw)


def cap(a, b, r, w0, w1, **kw) -> Part:
    """A capsule part around the segment a-b."""
    return Part("cap", {"a": a, "b": b, "r": r}, w0, w1, **kw)


def ring(c, ri, ro, w0, w1, umin=-np.inf, umax=np.inf, **kw) -> Part:
    """An elliptical annulus part, cut to u in [umin, umax]."""
    return Part("ring", {"c": c, "ri": ri, "r": ro, "umin": umin, "umax": umax}, w0, w1, **kw)


def mirror(make: Callable[[float], Part]) -> list[Part]:
    """Both sides of a bilateral part: ``make(side)`` with side = +1 (patient left) and -1."""
    return [make(1.0), make(-1.0)]


class Grid:
    """The volume's sampling and the spine's path: per-slice column centre and axial rotation.

    Args:
        shape: (Z, H, W) voxels.
        spacing: (dz, dy, dx) mm.
        s0: mm along the column (below the top of C1) of slice 0.
        yc, xc: (Z,) image mm of the column centre on each slice.
        theta: (Z,) axial rotation (radians) on each slice.
    """

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
        """Slices whose column position lies in [s_lo, s_hi]."""
        a = int(np.searchsorted(self.s, s_lo, side="left"))
        b = int(np.searchsorted(self.s, s_hi, side="right"))
        return slice(max(a, 0), min(b, self.Z))

    def local(self, zs: slice, rs: slice, cs: slice, top: float = 0.0, tilt: float = 0.0):
        """Local (u: posterior +, v: patient left +, w: caudal + from ``top``) mm coordinates of a box.

        Returns:
            u, v: (z, y, x) float32; w: (z, 1 or y, x) float32 (broadcasting with u and v).
        """
        dY = self.y[rs][None, :, None] - self.yc[zs][:, None, None]
        dX = self.x[cs][None, None, :] - self.xc[zs][:, None, None]
        c, s = self.cos[zs][:, None, None], self.sin[zs][:, None, None]
        u = c * dY + s * dX
        v = c * dX - s * dY
        w = (self.s[zs][:, None, None].astype(np.float32) - np.float32(top)) + np.float32(tilt) * u
        return u, v, w

    def box(self, s_lo, s_hi, cu, cv, R) -> Box | None:
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

    def part_box(self, part: Part, top: float, tilt: float) -> Box | None:
        """Index box that holds ``part`` placed at ``top`` with endplate ``tilt`` (remembered by the part)."""
        key = (id(self), top, tilt)
        if key not in part.boxes:
            part.boxes[key] = self._part_box(part, top, tilt)
        return part.boxes[key]

    def _part_box(self, part: Part, top: float, tilt: float) -> Box | None:
        cu, cv, R = part.bounds()
        uu = np.array([cu - R, cu + R])
        ws = np.concatenate([part.w0 + part.slope * (uu - part.uref), part.w1 + part.slope * (uu - part.uref)])
        s_lo = top + ws.min() - abs(tilt) * (abs(cu) + R) - 0.01
        s_hi = top + ws.max() + abs(tilt) * (abs(cu) + R) + 0.01
        return self.box(s_lo, s_hi, cu, cv, R + max(self.dy, self.dx))


def union(boxes: Iterable[Box | None]) -> Box | None:
    """The smallest box holding every box given (None when none is)."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def inner_box(inner: Box, outer: Box) -> Box:
    """``inner`` in the index frame of ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def parts_box(grid: Grid, parts: Sequence[Part], top: float, tilt: float) -> Box | None:
    """Index box of the union of the positive parts."""
    return union(grid.part_box(p, top, tilt) for p in parts if not p.neg)


def solid_mask(grid: Grid, parts: Sequence[Part], top: float, tilt: float, outer: Box,
               lesions: Sequence = ()) -> np.ndarray:
    """Boolean solid of ``parts`` inside the index box ``outer``.

    Each part is rasterised in its own sub-box. ``lesions`` may bend the bone: ``lesion.warp(u, v, w)`` moves
    coordinates (a displaced fragment) and ``lesion.cut(u, v, w)`` removes bone (a crushed endplate); both
    act in the level's local frame.

    Returns:
        (z, y, x) bool, the shape of ``outer``.
    """
    solid = np.zeros(tuple(s.stop - s.start for s in outer), bool)
    warps = [les for les in lesions if les.warps]
    for part in parts:
        box = grid.part_box(part, top, tilt)
        if box is None:
            continue
        box = tuple(slice(max(b.start, o.start), min(b.stop, o.stop)) for b, o in zip(box, outer))
        if any(b.stop <= b.start for b in box):
            continue
        u, v, w = grid.local(*box, top=top, tilt=tilt)
        if warps:
            u, v, w = np.broadcast_arrays(u, v, w)
            for les in warps:
                u, v, w = les.warp(u, v, w)
        m = part.mask(u, v, w)
        view = solid[inner_box(box, outer)]
        if part.neg:
            view &= ~m
        else:
            view |= m
    cuts = [les for les in lesions if les.cuts]
    if cuts:
        u, v, w = grid.local(*outer, top=top, tilt=tilt)
        for les in cuts:
            solid &= ~les.cut(u, v, w)
    return solid
