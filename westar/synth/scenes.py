"""Procedural 3D scenes rendered by vectorized ray casting (numpy only, no downloads).

A scene is a room: a ground plane, a back wall, two side walls, sometimes a ceiling, and
about a dozen objects (spheres, boxes turned about the vertical, cylinders, cones) standing
on the ground or stacked. Every surface gets a procedural solid texture (checker, stripes,
value noise, marble, gradient) and Lambertian shading under a directional light with
shadows, plus ambient light. A perspective camera with a random pose and field of view
looks into the room.

`render_scene(seed)` returns a `Scene` with

- ``image``: (H, W, 3) uint8 RGB,
- ``depth``: (H, W) float32 metric z-depth (distance along the optical axis) in meters,
  positive and finite at every pixel (the room is closed, there is no sky),
- ``instances``: (H, W) int32; one distinct id per surface: 1 ground, 2 back wall,
  3 left wall, 4 right wall, 5 ceiling (if any), objects from 6 on; 0 means none (not
  produced by this generator, reserved for "no instance" as in the dataset format).

The same seed gives the same scene, bit for bit, on any machine with the same numpy.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "Scene",
    "SceneParams",
    "render_scene",
    "GROUND_ID",
    "BACK_WALL_ID",
    "LEFT_WALL_ID",
    "RIGHT_WALL_ID",
    "CEILING_ID",
    "FIRST_OBJECT_ID",
]

GROUND_ID = 1
BACK_WALL_ID = 2
LEFT_WALL_ID = 3
RIGHT_WALL_ID = 4
CEILING_ID = 5
FIRST_OBJECT_ID = 6

_INF = np.float32(np.inf)
_EPS = 1e-4


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, meters
    instances: np.ndarray  # (H, W) int32
    meta: dict  # seed, camera, room, objects (id, kind, geometry)


@dataclasses.dataclass
class SceneParams:
    """Ranges the random scene is drawn from."""

    height: int = 126
    width: int = 126
    n_objects: tuple[int, int] = (8, 14)  # inclusive range
    room_width: tuple[float, float] = (4.0, 12.0)
    room_depth: tuple[float, float] = (6.0, 22.0)
    room_height: tuple[float, float] = (2.6, 4.5)
    p_ceiling: float = 0.5
    fov_deg: tuple[float, float] = (50.0, 80.0)  # horizontal field of view
    cam_height: tuple[float, float] = (0.8, 2.0)
    pitch_deg: tuple[float, float] = (-25.0, 0.0)  # negative looks down
    yaw_deg: tuple[float, float] = (-20.0, 20.0)
    roll_deg: tuple[float, float] = (-4.0, 4.0)
    shadows: bool = True


# --------------------------------------------------------------------------------------
# Primitives. Each has an `intersect(o, d)` returning t (N,) float32 (inf on a miss) for
# rays o + t d (d not normalized; t is then the camera z-depth), and a `normal(p)` for hit
# points p (M, 3). `local(p)` maps hit points to the object's frame for solid textures.
# --------------------------------------------------------------------------------------


class _Plane:
    """Points with dot(n, p) = c, the half-space dot(n, p) > c is the room's inside."""

    def __init__(self, n, c, inst, up_axis):
        self.n = np.asarray(n, np.float32)
        self.c = np.float32(c)
        self.inst = inst
        self.axes = up_axis  # two world axes used as texture coordinates

    def intersect(self, o, d):
        denom = d @ self.n
        num = self.c - o @ self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / denom
        t = np.where((t > _EPS) & (denom < 0), t, _INF).astype(np.float32)
        return t

    def normal(self, p):
        return np.broadcast_to(self.n, p.shape)

    def local(self, p):
        return p


class _Sphere:
    def __init__(self, center, radius, inst):
        self.c = np.asarray(center, np.float32)
        self.r = np.float32(radius)
        self.inst = inst

    def intersect(self, o, d):
        oc = o - self.c
        a = np.einsum("ij,ij->i", d, d)
        b = np.einsum("ij,ij->i", oc, d)
        cc = np.einsum("ij,ij->i", oc, oc) - self.r * self.r
        disc = b * b - a * cc
        hit = disc > 0
        sq = np.sqrt(np.where(hit, disc, 0))
        t0 = (-b - sq) / a
        t1 = (-b + sq) / a
        t = np.where(t0 > _EPS, t0, t1)
        return np.where(hit & (t > _EPS), t, _INF).astype(np.float32)

    def normal(self, p):
        return (p - self.c) / self.r

    def local(self, p):
        return p - self.c


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float32)


class _Box:
    """Box of half sizes h, turned by angle `yaw` about the vertical axis."""

    def __init__(self, center, half, yaw, inst):
        self.c = np.asarray(center, np.float32)
        self.h = np.asarray(half, np.float32)
        self.R = _rot_y(yaw)  # local -> world
        self.inst = inst

    def intersect(self, o, d):
        ol = (o - self.c) @ self.R  # world -> local (R orthonormal: x R = R^T x)
        dl = d @ self.R
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            ta = (-self.h - ol) * inv
            tb = (self.h - ol) * inv
        lo = np.fmin(ta, tb)  # fmin/fmax skip the NaN of 0 * inf (ray in a slab plane)
        hi = np.fmax(ta, tb)
        tmin = np.fmax(np.fmax(lo[:, 0], lo[:, 1]), lo[:, 2])
        tmax = np.fmin(np.fmin(hi[:, 0], hi[:, 1]), hi[:, 2])
        t = np.where(tmin > _EPS, tmin, tmax)
        return np.where((tmax >= tmin) & (t > _EPS), t, _INF).astype(np.float32)

    def normal(self, p):
        pl = (p - self.c) @ self.R
        q = np.abs(pl) / self.h
        ax = q.argmax(axis=1)
        nl = np.zeros_like(pl)
        nl[np.arange(len(pl)), ax] = np.sign(pl[np.arange(len(pl)), ax])
        return nl @ self.R.T

    def local(self, p):
        return (p - self.c) @ self.R


class _Cylinder:
    """Vertical cylinder: base center (x, y0, z), radius r, height hgt."""

    def __init__(self, base, radius, height, inst):
        self.b = np.asarray(base, np.float32)
        self.r = np.float32(radius)
        self.hgt = np.float32(height)
        self.inst = inst

    def intersect(self, o, d):
        ox, oy, oz = o[:, 0] - self.b[0], o[:, 1] - self.b[1], o[:, 2] - self.b[2]
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        cc = ox * ox + oz * oz - self.r * self.r
        disc = b * b - a * cc
        hit = (disc > 0) & (a > 1e-12)
        sq = np.sqrt(np.where(hit, disc, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            t0 = (-b - sq) / a
            t1 = (-b + sq) / a
        t = _side_hit(hit, t0, t1, oy, dy, self.hgt)
        for yc in (0.0, float(self.hgt)):  # caps
            t = _cap_hit(t, (ox, oy, oz), (dx, dy, dz), yc, self.r)
        return t.astype(np.float32)

    def normal(self, p):
        q = p - self.b
        n = np.stack([q[:, 0], np.zeros_like(q[:, 0]), q[:, 2]], axis=1) / self.r
        top = q[:, 1] >= self.hgt - 1e-3
        bot = q[:, 1] <= 1e-3
        n[top] = (0, 1, 0)
        n[bot] = (0, -1, 0)
        return n

    def local(self, p):
        return p - self.b


def _side_hit(hit, t0, t1, oy, dy, hgt):
    """Nearest of two side hits t0 <= t1 (N,) whose height y lies in [0, hgt] (inf: none);
    ray origin height oy and direction dy in the object's frame."""
    y0 = oy + t0 * dy
    y1 = oy + t1 * dy
    ok0 = hit & (t0 > _EPS) & (y0 >= 0) & (y0 <= hgt)
    ok1 = hit & (t1 > _EPS) & (y1 >= 0) & (y1 <= hgt)
    return np.where(ok0, t0, np.where(ok1, t1, _INF))


def _cap_hit(t, o, d, yc, r):
    """t (N,), replaced where the ray meets the disc y = yc, x^2 + z^2 <= r^2 nearer;
    o = (ox, oy, oz), d = (dx, dy, dz) in the object's frame."""
    (ox, oy, oz), (dx, dy, dz) = o, d
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (yc - oy) / dy
        xc = ox + tc * dx
        zc = oz + tc * dz
        okc = (tc > _EPS) & (xc * xc + zc * zc <= r * r)
        return np.where(okc & (tc < t), tc, t)


class _Cone:
    """Vertical cone: base center (x, y0, z), base radius r, apex at height hgt."""

    def __init__(self, base, radius, height, inst):
        self.b = np.asarray(base, np.float32)
        self.r = np.float32(radius)
        self.hgt = np.float32(height)
        self.k = np.float32(radius / height)
        self.inst = inst

    def intersect(self, o, d):
        ox, oy, oz = o[:, 0] - self.b[0], o[:, 1] - self.b[1], o[:, 2] - self.b[2]
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        k2 = self.k * self.k
        # x^2 + z^2 = k^2 (hgt - y)^2
        hy = self.hgt - oy
        a = dx * dx + dz * dz - k2 * dy * dy
        b = ox * dx + oz * dz + k2 * hy * dy
        cc = ox * ox + oz * oz - k2 * hy * hy
        disc = b * b - a * cc
        hit = (disc > 0) & (np.abs(a) > 1e-12)
        sq = np.sqrt(np.where(hit, disc, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = (-b - sq) / a
            tb = (-b + sq) / a
        t = _side_hit(hit, np.minimum(ta, tb), np.maximum(ta, tb), oy, dy, self.hgt)
        t = _cap_hit(t, (ox, oy, oz), (dx, dy, dz), 0.0, self.r)  # the base disc
        return t.astype(np.float32)

    def normal(self, p):
        q = p - self.b
        rho = np.sqrt(q[:, 0] ** 2 + q[:, 2] ** 2) + 1e-8
        n = np.stack([q[:, 0] / rho, np.full_like(rho, self.k), q[:, 2] / rho], axis=1)
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        bot = q[:, 1] <= 1e-3
        n[bot] = (0, -1, 0)
        return n

    def local(self, p):
        return p - self.b


# --------------------------------------------------------------------------------------
# Solid textures
# --------------------------------------------------------------------------------------


def _value_noise(p, lattice, scale):
    """Trilinear value noise on a periodic random lattice (L, L, L) at frequency 1/scale."""
    L = lattice.shape[0]
    q = p / scale
    f = np.floor(q)
    w = q - f
    w = w * w * (3 - 2 * w)  # smoothstep
    i = f.astype(np.int64) % L
    j = (i + 1) % L
    out = 0.0
    for cx in (0, 1):
        ix = i[:, 0] if cx == 0 else j[:, 0]
        wx = (1 - w[:, 0]) if cx == 0 else w[:, 0]
        for cy in (0, 1):
            iy = i[:, 1] if cy == 0 else j[:, 1]
            wy = (1 - w[:, 1]) if cy == 0 else w[:, 1]
            for cz in (0, 1):
                iz = i[:, 2] if cz == 0 else j[:, 2]
                wz = (1 - w[:, 2]) if cz == 0 else w[:, 2]
                out = out + lattice[ix, iy, iz] * (wx * wy * wz)
    return out


_TEXTURES = ("flat", "checker", "stripes", "noise", "marble", "gradient")


def _random_color(rng):
    # HSV with moderate saturation, converted to RGB
    h = rng.uniform(0, 1)
    s = rng.uniform(0.15, 0.85)
    v = rng.uniform(0.35, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32)


class _Material:
    def __init__(self, rng, lattice):
        self.kind = _TEXTURES[rng.integers(len(_TEXTURES))]
        self.c1 = _random_color(rng)
        self.c2 = _random_color(rng) if rng.uniform() < 0.7 else self.c1 * rng.uniform(0.3, 0.7)
        self.scale = np.float32(rng.uniform(0.1, 0.8))
        axis = rng.normal(size=3).astype(np.float32)
        self.axis = axis / np.linalg.norm(axis)
        self.offset = rng.uniform(-10, 10, size=3).astype(np.float32)
        self.lattice = lattice
        self.grain = np.float32(rng.uniform(0.0, 0.25))  # fine noise amplitude

    def color(self, p):
        q = p + self.offset
        s = self.scale
        if self.kind == "flat":
            m = np.zeros(len(q), np.float32)
        elif self.kind == "checker":
            f = np.floor(q / s).astype(np.int64).sum(axis=1)
            m = (f & 1).astype(np.float32)
        elif self.kind == "stripes":
            m = (np.floor(q @ self.axis / s).astype(np.int64) & 1).astype(np.float32)
        elif self.kind == "noise":
            m = _value_noise(q, self.lattice, s)
        elif self.kind == "marble":
            n = _value_noise(q, self.lattice, s)
            m = 0.5 + 0.5 * np.sin((q @ self.axis) * (6.0 / s) + 6.0 * n)
        else:  # gradient
            m = np.clip(0.5 + (q - self.offset) @ self.axis / (8 * s), 0, 1)
        if self.grain > 0:
            m = m + self.grain * (_value_noise(q, self.lattice, 0.04) - 0.5)
        m = np.clip(m, 0, 1)[:, None]
        return (1 - m) * self.c1 + m * self.c2


# --------------------------------------------------------------------------------------
# Scene construction
# --------------------------------------------------------------------------------------


def _geometry(pr) -> dict:
    """Plain-float description of an object primitive (for meta and tests)."""
    if isinstance(pr, _Sphere):
        return dict(center=pr.c.tolist(), radius=float(pr.r))
    if isinstance(pr, _Box):
        yaw = math.atan2(float(pr.R[0, 2]), float(pr.R[0, 0]))
        return dict(center=pr.c.tolist(), half=pr.h.tolist(), yaw=yaw)
    return dict(base=pr.b.tolist(), radius=float(pr.r), height=float(pr.hgt))


def _build_scene(rng, prm: SceneParams):
    rw = rng.uniform(*prm.room_width)
    rd = rng.uniform(*prm.room_depth)
    rh = rng.uniform(*prm.room_height)
    has_ceiling = rng.uniform() < prm.p_ceiling
    # room spans x in [-rw/2, rw/2], y in [0, rh or inf], z in [-1, rd]; camera near z=0
    prims = [
        _Plane((0, 1, 0), 0.0, GROUND_ID, (0, 2)),
        _Plane((0, 0, -1), -rd, BACK_WALL_ID, (0, 1)),
        _Plane((1, 0, 0), -rw / 2, LEFT_WALL_ID, (2, 1)),
        _Plane((-1, 0, 0), -rw / 2, RIGHT_WALL_ID, (2, 1)),
    ]
    # a wall behind the camera so that no ray can escape; with the default field of view
    # and yaw ranges it is never visible
    prims.append(_Plane((0, 0, 1), -1.5, BACK_WALL_ID, (0, 1)))
    if has_ceiling:
        prims.append(_Plane((0, -1, 0), -rh, CEILING_ID, (0, 2)))
    else:  # open top: walls reach up to a far "sky" ceiling (same id as a ceiling)
        prims.append(_Plane((0, -1, 0), -60.0, CEILING_ID, (0, 2)))

    n_obj = int(rng.integers(prm.n_objects[0], prm.n_objects[1] + 1))
    inst = FIRST_OBJECT_ID
    placed = []  # (x, z, footprint radius, top height) for stacking
    kinds = []
    for _ in range(n_obj):
        kind = ("sphere", "box", "cylinder", "cone")[rng.integers(4)]
        size = rng.uniform(0.15, 0.9) * (1 + 0.6 * rng.uniform() * (rd > 12))
        x = rng.uniform(-rw / 2 + 0.3, rw / 2 - 0.3)
        z = rng.uniform(1.2, rd - 0.4)
        y0 = 0.0
        if placed and rng.uniform() < 0.2:  # stack on an earlier object with a flat top
            px, pz, pr, ptop = placed[rng.integers(len(placed))]
            if pr >= 0.15:
                x, z, y0 = px, pz, ptop
                size = min(size, pr)
        if kind == "sphere":
            r = size
            prims.append(_Sphere((x, y0 + r, z), r, inst))
            placed.append((x, z, r, y0 + 2 * r))
        elif kind == "box":
            half = np.array([size, size * rng.uniform(0.4, 2.0), size * rng.uniform(0.5, 1.5)])
            half *= rng.uniform(0.6, 1.0)
            prims.append(_Box((x, y0 + half[1], z), half, rng.uniform(0, np.pi), inst))
            placed.append((x, z, float(min(half[0], half[2])), y0 + 2 * half[1]))
        elif kind == "cylinder":
            r = size * rng.uniform(0.4, 1.0)
            h = size * rng.uniform(0.8, 3.5)
            prims.append(_Cylinder((x, y0, z), r, h, inst))
            placed.append((x, z, r, y0 + h))
        else:
            r = size * rng.uniform(0.5, 1.0)
            h = size * rng.uniform(1.0, 3.0)
            prims.append(_Cone((x, y0, z), r, h, inst))
            placed.append((x, z, 0.0, y0 + h))
        kinds.append(dict(id=inst, kind=kind, **_geometry(prims[-1])))
        inst += 1
    room = dict(width=rw, depth=rd, height=rh, ceiling=bool(has_ceiling))
    return prims, kinds, room


def _camera(rng, prm: SceneParams, room):
    H, W = prm.height, prm.width
    fov = math.radians(rng.uniform(*prm.fov_deg))
    ch = rng.uniform(*prm.cam_height)
    if room["ceiling"]:
        ch = min(ch, room["height"] - 0.3)
    pos = np.array([rng.uniform(-0.3, 0.3) * room["width"] / 2, ch, 0.0], np.float32)
    pitch = math.radians(rng.uniform(*prm.pitch_deg))
    yaw = math.radians(rng.uniform(*prm.yaw_deg))
    roll = math.radians(rng.uniform(*prm.roll_deg))
    # camera frame: right, up, forward (world y up, z forward)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    fwd = np.array([sy * cp, sp, cy * cp], np.float32)
    right = np.array([cy, 0.0, -sy], np.float32)
    up = np.cross(fwd, right).astype(np.float32)
    cr, sr = math.cos(roll), math.sin(roll)
    right, up = cr * right + sr * up, -sr * right + cr * up
    fx = (W / 2) / math.tan(fov / 2)
    xs = (np.arange(W, dtype=np.float32) + 0.5 - W / 2) / fx
    ys = (H / 2 - np.arange(H, dtype=np.float32) - 0.5) / fx
    gx, gy = np.meshgrid(xs, ys)
    d = fwd[None] + gx.reshape(-1, 1) * right[None] + gy.reshape(-1, 1) * up[None]
    cam = dict(
        position=pos.tolist(),
        forward=fwd.tolist(),
        right=right.tolist(),
        up=up.tolist(),
        fx=float(fx),
        fov_deg=math.degrees(fov),
    )
    return pos, d.astype(np.float32), cam


def _bounding_sphere(pr):
    """(center, radius) enclosing an object primitive; None for planes."""
    if isinstance(pr, _Sphere):
        return pr.c, float(pr.r)
    if isinstance(pr, _Box):
        return pr.c, float(np.linalg.norm(pr.h))
    if isinstance(pr, (_Cylinder, _Cone)):
        half = float(pr.hgt) / 2
        c = pr.b + np.array([0, half, 0], np.float32)
        return c, math.hypot(float(pr.r), half)
    return None


def _screen_window(pr, pos, cam, H, W):
    """Conservative pixel window (i0, i1, j0, j1) that holds a primitive's projection.

    Returns None for "test every pixel" (planes, or a bound that reaches behind the
    camera) and an empty window when the primitive is out of view.
    """
    if isinstance(pr, _Box):
        return _box_window(pr, pos, cam, H, W)
    bs = _bounding_sphere(pr)
    if bs is None:
        return None
    c, R = bs
    v = c - pos
    xc, yc, zc = float(v @ cam["right"]), float(v @ cam["up"]), float(v @ cam["forward"])
    if zc - R <= 1e-2:
        return None
    fx = cam["fx"]
    gx = [(xc + a) / (zc + b) for a in (-R, R) for b in (-R, R)]
    gy = [(yc + a) / (zc + b) for a in (-R, R) for b in (-R, R)]
    return _pixel_window(gx, gy, fx, H, W)


_CORNER_SIGNS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
_BOX_EDGES = np.array(
    [(i, j) for i in range(8) for j in range(i + 1, 8) if bin(i ^ j).count("1") == 1]
).T  # (2, 12) corner indices


def _box_window(pr, pos, cam, H, W):
    """Pixel window of a box: the projection of the box clipped to the half-space in front
    of the camera (its corners there and the points where its edges cross the near plane);
    tighter than a bounding sphere for long boxes, and valid when one reaches behind."""
    corners = pr.c.astype(float) + (_CORNER_SIGNS * pr.h) @ pr.R.T.astype(float)
    v = corners - pos
    x, y, z = v @ cam["right"], v @ cam["up"], v @ cam["forward"]
    near = _EPS  # rays hit at t > _EPS; t is the z-depth
    front = z >= near
    if front.all():
        return _pixel_window(x / z, y / z, cam["fx"], H, W)
    i, j = _BOX_EDGES
    cross = front[i] != front[j]
    if not front.any():
        return 0, 0, 0, 0
    i, j = i[cross], j[cross]
    f = (near - z[i]) / (z[j] - z[i])
    gx = np.concatenate([x[front] / z[front], (x[i] + f * (x[j] - x[i])) / near])
    gy = np.concatenate([y[front] / z[front], (y[i] + f * (y[j] - y[i])) / near])
    return _pixel_window(gx, gy, cam["fx"], H, W)


def _pixel_window(gx, gy, fx, H, W):
    """Conservative pixel window around image-plane points (x/z, y/z)."""
    j0 = math.floor(min(gx) * fx + W / 2 - 0.5) - 1
    j1 = math.ceil(max(gx) * fx + W / 2 - 0.5) + 2
    i0 = math.floor(H / 2 - 0.5 - max(gy) * fx) - 1
    i1 = math.ceil(H / 2 - 0.5 - min(gy) * fx) + 2
    return max(i0, 0), min(i1, H), max(j0, 0), min(j1, W)


def _cast(prims, pos, d, cam, H, W):
    """Nearest hit: (t, index of primitive) per ray; objects only tested in their window."""
    best_t = np.full((H, W), _INF, np.float32)
    best_i = np.full((H, W), -1, np.int32)
    d3 = d.reshape(H, W, 3)
    cam_np = {k: np.asarray(v, np.float32) if isinstance(v, list) else v for k, v in cam.items()}
    for k, pr in enumerate(prims):
        win = _screen_window(pr, pos, cam_np, H, W)
        i0, i1, j0, j1 = (0, H, 0, W) if win is None else win
        if i1 <= i0 or j1 <= j0:
            continue
        dd = d3[i0:i1, j0:j1].reshape(-1, 3)
        t = pr.intersect(np.broadcast_to(pos, dd.shape), dd).reshape(i1 - i0, j1 - j0)
        bt = best_t[i0:i1, j0:j1]
        closer = t < bt
        bt[closer] = t[closer]
        best_i[i0:i1, j0:j1][closer] = k
    return best_t.reshape(-1), best_i.reshape(-1)


def _occluded(prims, p, ldir):
    """Whether the ray from p towards the (directional) light hits an object.

    Points are indexed by their coordinates across the light (sorted along one axis), so
    each object only tests the points whose shadow rays can pass near its bounding sphere;
    the exact bounding-sphere test and the intersection then run on those alone (the result
    is the same as testing every point against every object).
    """
    occ = np.zeros(len(p), bool)
    if len(p) == 0:
        return occ
    l64 = ldir.astype(np.float64)
    e1 = np.cross(l64, [0.0, 0.0, 1.0] if abs(l64[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(l64, e1)
    a, b = p @ e1, p @ e2
    order = np.argsort(a, kind="stable")
    a_sorted = a[order]
    for pr in prims:
        bs = _bounding_sphere(pr)
        if bs is None:
            continue
        c, R = bs
        # generous margin: the float32 test below may accept slightly beyond R
        m = 1.01 * R + 0.05
        ca, cb = float(c @ e1), float(c @ e2)
        lo, hi = np.searchsorted(a_sorted, [ca - m, ca + m])
        near = order[lo:hi]
        near = near[np.abs(b[near] - cb) <= m]
        if len(near) == 0:
            continue
        v = c - p[near]
        tca = v @ ldir
        cand = (tca > -R) & (np.einsum("ij,ij->i", v, v) - tca * tca <= R * R) & ~occ[near]
        if not cand.any():
            continue
        sel = near[cand]
        t = pr.intersect(p[sel], np.broadcast_to(ldir, (len(sel), 3)))
        occ[sel[np.isfinite(t)]] = True
    return occ


def _hit_surfaces(prims, mats, pos, d, cam, H, W, what="scene"):
    """Cast the camera rays and look up what they hit.

    Returns t (N,) z-depth, p (N, 3) hit points, normals (N, 3), base colours (N, 3) from
    each primitive's material (`mats[k].color(local point)`), instance ids (N,) int32 and
    the index of the primitive hit (N,) int32. Raises if a ray escapes (infinite depth).
    """
    o = np.broadcast_to(pos, d.shape)
    t, idx = _cast(prims, pos, d, cam, H, W)
    if not np.all(np.isfinite(t)):  # the generators close their scenes; be safe
        raise RuntimeError(f"{what}: rays escaped the scene")
    p = o + t[:, None] * d
    rgb = np.zeros((len(d), 3), np.float32)
    normals = np.zeros((len(d), 3), np.float32)
    inst = np.zeros(len(d), np.int32)
    for k, pr in enumerate(prims):
        sel = np.nonzero(idx == k)[0]
        if len(sel) == 0:
            continue
        pk = p[sel]
        normals[sel] = pr.normal(pk)
        rgb[sel] = mats[k].color(pr.local(pk))
        inst[sel] = pr.inst
    return t, p, normals, rgb, inst, idx


def _sun_shading(prims, p, normals, ldir, shadows=True):
    """Lambert factor (N,) in [0, 1] of a directional light `ldir`, 0 where an object
    (not a plane) stands between the point and the light when `shadows`."""
    lam = np.clip(normals @ ldir, 0, None)
    if not shadows:
        return lam
    lit = lam > 0
    pl = p[lit] + normals[lit] * 1e-3
    occ = _occluded(prims, pl, ldir)
    shade = lam.copy()
    shade[np.nonzero(lit)[0][occ]] = 0.0
    return shade


def render_scene(seed: int, params: SceneParams | None = None) -> Scene:
    """Render one random scene, fully determined by `seed` (and `params`)."""
    prm = params or SceneParams()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    lattice = rng.uniform(0, 1, size=(16, 16, 16)).astype(np.float32)
    prims, kinds, room = _build_scene(rng, prm)
    pos, d, cam = _camera(rng, prm, room)
    mats = [_Material(rng, lattice) for _ in prims]
    # light: a directional sun/lamp from above, mostly from behind the camera (z < 0) so
    # that the walls facing the camera are lit
    el = rng.uniform(math.radians(25), math.radians(75))
    az = rng.uniform(1.1 * math.pi, 1.9 * math.pi)
    ldir = np.array(
        [math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az)], np.float32
    )
    ambient = np.float32(rng.uniform(0.15, 0.4))
    light_col = (1.0 + rng.uniform(-0.15, 0.15, size=3)).astype(np.float32)
    exposure = np.float32(rng.uniform(0.9, 1.3))

    H, W = prm.height, prm.width
    t, p, normals, rgb, inst, _ = _hit_surfaces(prims, mats, pos, d, cam, H, W, f"scene {seed}")
    shade = _sun_shading(prims, p, normals, ldir, prm.shadows)
    # a soft fall-off with distance from the camera (lamp near the viewer), mild
    fall = 1.0 / (1.0 + 0.02 * t)
    col = rgb * (ambient + (1 - ambient) * shade[:, None] * light_col) * (fall * exposure)[:, None]
    img = np.clip(col, 0, 1) ** (1 / 1.8)  # gamma-ish
    image = (img * 255 + 0.5).astype(np.uint8).reshape(H, W, 3)
    depth = t.reshape(H, W).astype(np.float32)
    instances = inst.reshape(H, W)
    meta = dict(seed=int(seed), camera=cam, room=room, objects=kinds)
    return Scene(image=image, depth=depth, instances=instances, meta=meta)
