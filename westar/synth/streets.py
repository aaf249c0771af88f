"""Procedural outdoor streets: the second scene family (a natural domain shift from rooms).

Same ray caster, primitives, label formats and `Scene` type as `westar.synth.scenes`, but a
different world. A camera mounted on a car (1.2-2.0 m high, pitch -10..+2 degrees, field of
view 60-90 degrees) looks along a straight street:

- a road (the ground plane, asphalt with lane markings) between two raised sidewalks
  (15 cm curbs, paving slabs) that also run under the buildings, so alleys show pavement;
- building blocks (boxes) on both sides, 4-35 m high (a suburb to downtown), with facades of brick, plaster,
  concrete or glass and a grid of windows, sometimes with alleys between them;
- lamp posts (thin cylinder + arm + lamp box) and trees (trunk cylinder + sphere crown)
  along the curbs, cars and the odd van (a body, a cabin and a dark underbody, all boxes)
  parked along the curbs or driving in the lanes;
- at the end of the street a skyline of distant blocks and sometimes hills (60-75 m);
- a sky: a backdrop of planes (far wall at 60-75 m, side walls at 60 m, a lid, one behind
  the camera) with a sky gradient and clouds, unshaded and haze-coloured at the horizon.
  So every pixel has a finite, positive depth (max about 80 m, the KITTI cap), like rooms;
  the sky's depth is that of a backdrop, a choice of this generator, not a physical value
  (``StreetParams(sky_depth=False)`` writes 0, "invalid", there instead, as lidar would).

Lighting differs from rooms: a sun low over the horizon (elevation 8-40 degrees, any
azimuth) with warm or cool colour and long shadows (a quarter of the days overcast: weak
sun, bright grey sky), a blue skylight ambient, no fall-off
towards the camera, and aerial perspective (haze that starts beyond 15 m).

`render_street(seed)` returns a `Scene` with

- ``image``: (H, W, 3) uint8 RGB,
- ``depth``: (H, W) float32 metric z-depth (along the optical axis) in meters, positive and
  finite at every pixel,
- ``instances``: (H, W) int32, fixed ids: 1 road, 2 left sidewalk, 3 right sidewalk, 4 sky
  (every backdrop plane), objects from 5 on, one id per object (a car's body, cabin and
  underbody share its id, as do a tree's trunk and crown and a lamp post's parts); 0 is not
  produced ("no instance" in the dataset format). ``meta["objects"]`` lists each object's
  id, kind (building, far_building, hill, lamp_post, tree, car, van) and its parts.

The same seed gives the same street, bit for bit, on any machine with the same numpy.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .scenes import (
    Scene,
    _Box,
    _camera,
    _Cylinder,
    _geometry,
    _hit_surfaces,
    _Plane,
    _Sphere,
    _sun_shading,
    _value_noise,
)

__all__ = [
    "StreetParams",
    "render_street",
    "ROAD_ID",
    "LEFT_SIDEWALK_ID",
    "RIGHT_SIDEWALK_ID",
    "SKY_ID",
    "FIRST_OBJECT_ID",
    "OBJECT_KINDS",
]

ROAD_ID = 1
LEFT_SIDEWALK_ID = 2
RIGHT_SIDEWALK_ID = 3
SKY_ID = 4
FIRST_OBJECT_ID = 5
OBJECT_KINDS = ("building", "far_building", "hill", "lamp_post", "tree", "car", "van")


@dataclasses.dataclass
class StreetParams:
    """Ranges the random street is drawn from (lengths in meters, angles in degrees)."""

    height: int = 126
    width: int = 126
    fov_deg: tuple[float, float] = (60.0, 90.0)  # horizontal field of view
    cam_height: tuple[float, float] = (1.2, 2.0)
    pitch_deg: tuple[float, float] = (-10.0, 2.0)  # negative looks down
    yaw_deg: tuple[float, float] = (-6.0, 6.0)
    roll_deg: tuple[float, float] = (-2.0, 2.0)
    road_width: tuple[float, float] = (7.0, 15.0)
    sidewalk_width: tuple[float, float] = (2.0, 5.0)
    backdrop_distance: tuple[float, float] = (60.0, 75.0)  # far sky wall, along the street
    n_cars: tuple[int, int] = (2, 8)  # inclusive range
    shadows: bool = True
    # False: depth 0 (invalid in the dataset format) on sky pixels, as in real driving data
    sky_depth: bool = True


_SIDE_SKY = 60.0  # the side sky walls, |x| in meters
_CURB = 0.15  # sidewalk height


# --------------------------------------------------------------------------------------
# Materials: `color(p)` maps points in a primitive's local frame (N, 3) to RGB (N, 3)
# --------------------------------------------------------------------------------------


def _hsv(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _cell_random(lattice, a, b, c=0):
    """A pseudo-random value in [0, 1) per integer cell (a, b, c) (arrays of ints)."""
    L = lattice.shape[0]
    return lattice[a % L, b % L, (c + a // L * 7 + b // L * 3) % L]


class _Flat:
    """One colour with some value-noise grain (poles, car bodies, bark, hills)."""

    def __init__(self, color, lattice, grain=0.1, scale=0.3):
        self.c = np.asarray(color, np.float32)
        self.lattice, self.grain, self.scale = lattice, np.float32(grain), scale

    def color(self, p):
        n = _value_noise(p, self.lattice, self.scale) - 0.5
        return np.clip(self.c * (1 + self.grain * 2 * n[:, None]), 0, 1)


class _Foliage:
    """Leafy green: two octaves of noise between a dark and a light green."""

    def __init__(self, rng, lattice):
        h = rng.uniform(0.2, 0.36)
        self.c1 = _hsv(h, rng.uniform(0.5, 0.8), rng.uniform(0.15, 0.3)).astype(np.float32)
        self.c2 = _hsv(h + 0.03, rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.65)).astype(np.float32)
        self.lattice = lattice

    def color(self, p):
        m = 0.6 * _value_noise(p, self.lattice, 0.5) + 0.6 * _value_noise(p, self.lattice, 0.12)
        m = np.clip(m - 0.1, 0, 1)[:, None]
        return (1 - m) * self.c1 + m * self.c2


class _Asphalt:
    """Road (world coordinates): grey asphalt, a dashed centre line, solid edge lines."""

    def __init__(self, rng, lattice, center_x, width):
        self.base = np.float32(rng.uniform(0.16, 0.32)) * (1 + rng.uniform(-0.05, 0.05, 3))
        self.lattice = lattice
        self.cx, self.half = np.float32(center_x), np.float32(width / 2)
        self.paint = np.array([1.0, 0.85, 0.3] if rng.uniform() < 0.3 else [0.92] * 3, np.float32)
        self.dash = np.float32(rng.uniform(3.0, 6.0))
        self.offset = np.float32(rng.uniform(0, 10))

    def color(self, p):
        n = _value_noise(p, self.lattice, 0.08)
        c = self.base[None] * (0.8 + 0.35 * n[:, None])
        x = p[:, 0] - self.cx
        z = p[:, 2] + self.offset
        centre = (np.abs(x) < 0.08) & (np.mod(z / self.dash, 1.0) < 0.45)
        edge = np.abs(np.abs(x) - (self.half - 0.35)) < 0.07
        mark = centre | edge
        c[mark] = self.paint * (0.8 + 0.2 * n[mark, None])
        return c.astype(np.float32)


class _Paving:
    """Sidewalk (box local frame): light slabs with dark joints, a darker curb stone."""

    def __init__(self, rng, lattice, curb_x):
        v = rng.uniform(0.45, 0.7)
        self.base = (_hsv(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.2), v)).astype(np.float32)
        self.slab = np.float32(rng.uniform(0.6, 1.2))
        self.lattice = lattice
        self.curb_x = np.float32(curb_x)  # local x of the curb face

    def color(self, p):
        n = _value_noise(p, self.lattice, 0.1)
        c = self.base[None] * (0.85 + 0.25 * n[:, None])
        fx = np.mod(p[:, 0] / self.slab, 1.0)
        fz = np.mod(p[:, 2] / self.slab, 1.0)
        joint = (np.minimum(fx, 1 - fx) < 0.04) | (np.minimum(fz, 1 - fz) < 0.04)
        c[joint] *= 0.6
        curb = np.abs(p[:, 0] - self.curb_x) < 0.25
        c[curb] = 0.75 * self.base * (0.9 + 0.2 * n[curb, None])
        return c.astype(np.float32)


_FACADES = ("brick", "plaster", "concrete", "glass")


class _Facade:
    """Building (box local frame, half sizes `half`): a wall material and a window grid.

    Texture coordinates: u = x + z runs along whichever vertical face is hit, y + half_y
    is the height above the ground; storeys of 2.8-3.6 m, window bays of 2.2-4 m.
    """

    def __init__(self, rng, lattice, half, far=False):
        self.kind = _FACADES[rng.integers(len(_FACADES))]
        if self.kind == "brick":
            wall = _hsv(rng.uniform(0.0, 0.08), rng.uniform(0.45, 0.75), rng.uniform(0.35, 0.6))
        elif self.kind == "plaster":
            wall = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.9))
        elif self.kind == "concrete":
            wall = _hsv(rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.1), rng.uniform(0.45, 0.75))
        else:
            wall = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.35), rng.uniform(0.25, 0.45))
        if far:  # distant blocks: desaturated, bluish
            wall = 0.6 * wall + 0.4 * np.array([0.55, 0.6, 0.7]) * wall.mean() / 0.6
        self.wall = wall.astype(np.float32)
        self.glass = _hsv(rng.uniform(0.5, 0.65), rng.uniform(0.2, 0.5), rng.uniform(0.12, 0.3))
        self.glass = self.glass.astype(np.float32)
        self.frame = np.float32(rng.uniform(0.1, 0.3))  # share of a bay that is wall
        self.storey = np.float32(rng.uniform(2.8, 3.6))
        self.bay = np.float32(rng.uniform(2.2, 4.0))
        self.sill = np.float32(rng.uniform(0.25, 0.4))  # share of a storey below the window
        self.hy = np.float32(half[1])
        self.lattice = lattice
        self.seed3 = int(rng.integers(16))

    def color(self, p):
        u = p[:, 0] + p[:, 2]
        y = p[:, 1] + self.hy
        n = _value_noise(p, self.lattice, 0.05 if self.kind == "brick" else 0.4)
        c = self.wall[None] * (0.85 + 0.3 * n[:, None])
        if self.kind == "brick":  # mortar bands every 0.6 m (visible near the camera)
            c[np.mod(y / 0.6, 1.0) < 0.08] *= 0.8
        if self.kind == "concrete":  # panel joints at each storey
            c[np.mod(y / self.storey, 1.0) < 0.04] *= 0.7
        fu = np.mod(u / self.bay, 1.0)
        fy = np.mod(y / self.storey, 1.0)
        frame = 0.05 if self.kind == "glass" else self.frame / 2
        sill = 0.08 if self.kind == "glass" else self.sill
        win = (fu > frame) & (fu < 1 - frame) & (fy > sill) & (fy < 0.92)
        win &= (y > 0.3) & (y < 2 * self.hy - 0.6)
        if win.any():
            iu = np.floor(u[win] / self.bay).astype(np.int64)
            iy = np.floor(y[win] / self.storey).astype(np.int64)
            r = _cell_random(self.lattice, iu, iy, self.seed3)
            shade = (0.5 + 1.2 * r)[:, None]
            lit = r > 0.93  # a lit room now and then
            c[win] = np.where(lit[:, None], np.array([1.0, 0.85, 0.55]), self.glass * shade)
        return c.astype(np.float32)


class _Sky:
    """Backdrop planes (world coordinates): horizon-to-zenith gradient by the elevation
    angle seen from the camera, and soft clouds."""

    def __init__(self, rng, lattice, cam_pos, horizon, overcast=False):
        self.horizon = np.asarray(horizon, np.float32)
        self.zenith = _hsv(rng.uniform(0.55, 0.64), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.9))
        if overcast:  # grey sky, full of cloud
            self.zenith = 0.3 * self.zenith + 0.7 * np.array([0.7, 0.72, 0.75])
        self.zenith = self.zenith.astype(np.float32)
        self.cloud = np.float32(rng.uniform(1.3, 1.6) if overcast else rng.uniform(0.0, 1.0))
        self.cloud_col = np.array([0.97, 0.97, 0.99], np.float32) * rng.uniform(0.8, 1.0)
        self.pos = np.asarray(cam_pos, np.float32)
        self.lattice = lattice

    def color(self, p):
        v = p - self.pos
        elev = np.arctan2(v[:, 1], np.hypot(v[:, 0], v[:, 2]))
        m = np.clip(elev / 0.6, 0, 1)[:, None] ** 0.7
        c = (1 - m) * self.horizon + m * self.zenith
        cl = _value_noise(p * np.float32([1, 2.5, 1]), self.lattice, 12.0)
        cl += 0.25 * _value_noise(p, self.lattice, 3.0)
        a = np.clip((cl - 1.0 + 0.5 * self.cloud) * 3, 0, 1) * np.clip(elev / 0.05, 0, 1)
        a = a[:, None]
        return ((1 - a) * c + a * self.cloud_col).astype(np.float32)


_CAR_PAINT = (
    (0.92, 0.92, 0.9),
    (0.08, 0.08, 0.09),
    (0.6, 0.62, 0.64),
    (0.7, 0.08, 0.07),
    (0.1, 0.2, 0.55),
    (0.2, 0.35, 0.25),
    (0.85, 0.7, 0.2),
    (0.35, 0.36, 0.38),
)


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


class _Objects:
    """Collects primitives, their materials and the meta list; one id per object."""

    def __init__(self):
        self.prims, self.mats, self.meta = [], [], []
        self.next_id = FIRST_OBJECT_ID
        # the primitives tested for sun shadows: the objects, not the road and sidewalks (a
        # 15 cm curb's shadow is not worth a test per pixel) nor the lamp heads
        self.casters = []

    def add_surface(self, prim, mat, casts_shadow=False):
        self.prims.append(prim)
        self.mats.append(mat)
        if casts_shadow:
            self.casters.append(prim)

    def add_object(self, kind, parts, n_casters=None):
        """parts: [(primitive with inst=None, material)], the first `n_casters` (all if None)
        cast shadows; gives them all a new id."""
        oid = self.next_id
        self.next_id += 1
        n_casters = len(parts) if n_casters is None else n_casters
        for k, (pr, mat) in enumerate(parts):
            pr.inst = oid
            self.add_surface(pr, mat, casts_shadow=k < n_casters)
        self.meta.append(dict(id=oid, kind=kind, parts=[_geometry(pr) for pr, _ in parts]))


def _buildings(rng, lattice, objs, side, facade_x, z_end, max_height):
    """Blocks along one side (side -1 left, +1 right) from behind the camera to z_end."""
    z = rng.uniform(-14.0, -6.0)
    while z < z_end:
        length = rng.uniform(6.0, 20.0)
        if rng.uniform() < 0.25:  # an alley
            z += rng.uniform(2.0, 6.0)
        z1 = min(z + length, z_end + 4)
        setback = rng.uniform(0.0, 1.5) if rng.uniform() < 0.5 else 0.0
        deep = rng.uniform(8.0, 20.0)
        tall = rng.uniform(4.0, max_height) if rng.uniform() < 0.8 else rng.uniform(4.0, 10.0)
        x_front = facade_x + side * setback
        half = np.array([deep / 2, tall / 2, (z1 - z) / 2])
        center = (x_front + side * deep / 2, tall / 2, (z + z1) / 2)
        objs.add_object("building", [(_Box(center, half, 0.0, None), _Facade(rng, lattice, half))])
        z = z1


def _skyline(rng, lattice, objs, back):
    """Distant blocks and sometimes hills just in front of the far sky wall."""
    for _ in range(int(rng.integers(4, 11))):
        w, deep, tall = rng.uniform(8, 25), rng.uniform(5, 12), rng.uniform(8, 45)
        z = rng.uniform(back - 14.0, back - 2.0 - deep / 2)
        x = rng.uniform(-0.8, 0.8) * _SIDE_SKY
        half = np.array([w / 2, tall / 2, deep / 2])
        objs.add_object(
            "far_building",
            [
                (
                    _Box((x, tall / 2, z), half, rng.uniform(-0.3, 0.3), None),
                    _Facade(rng, lattice, half, far=True),
                )
            ],
        )
    if rng.uniform() < 0.5:
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(30.0, 60.0)
            c = (rng.uniform(-40, 40), -r * rng.uniform(0.55, 0.85), back + r * 0.2)
            col = _hsv(rng.uniform(0.18, 0.33), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.5))
            objs.add_object("hill", [(_Sphere(c, r, None), _Flat(col, lattice, 0.3, 3.0))])


def _street_furniture(rng, lattice, objs, side, curb_x, walk_w, z_end):
    """Lamp posts and trees along one curb (curb_x: the curb line, side -1 or +1)."""
    pole_col = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.12, 0.4))
    spacing = rng.uniform(12.0, 25.0)
    z = rng.uniform(-4.0, spacing)
    while z < z_end:
        x = curb_x + side * rng.uniform(0.4, 0.7)
        hgt = rng.uniform(4.0, 8.0)
        r = rng.uniform(0.06, 0.12)
        arm = rng.uniform(1.0, 2.0)
        parts = [
            (_Cylinder((x, _CURB, z), r, hgt, None), _Flat(pole_col, lattice, 0.05)),
            (
                _Box((x - side * arm / 2, _CURB + hgt - 0.1, z), (arm / 2, 0.05, 0.05), 0.0, None),
                _Flat(pole_col, lattice, 0.05),
            ),
            (
                _Box((x - side * arm, _CURB + hgt - 0.2, z), (0.3, 0.08, 0.15), 0.0, None),
                _Flat((0.95, 0.93, 0.8), lattice, 0.02),
            ),
        ]
        objs.add_object("lamp_post", parts, n_casters=1)  # the pole's shadow, not the head's
        if rng.uniform() < 0.7:  # a tree between this post and the next
            tz = z + spacing * rng.uniform(0.35, 0.65)
            if tz < z_end:
                tx = curb_x + side * rng.uniform(0.8, max(walk_w - 0.8, 0.9))
                th = rng.uniform(1.8, 3.5)
                cr = rng.uniform(1.2, 2.6)
                bark = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.15, 0.3))
                parts = [
                    (
                        _Cylinder((tx, _CURB, tz), rng.uniform(0.1, 0.22), th + cr * 0.5, None),
                        _Flat(bark, lattice, 0.3, 0.1),
                    ),
                    (_Sphere((tx, _CURB + th + cr * 0.8, tz), cr, None), _Foliage(rng, lattice)),
                ]
                objs.add_object("tree", parts)
        z += spacing * rng.uniform(0.8, 1.2)


def _cars(rng, lattice, objs, prm, road_cx, road_w, z_end):
    """Parked cars along both curbs and driving ones in the lanes; no overlaps."""
    n_lanes = max(2, int(road_w // 3.5))
    lane_w = road_w / n_lanes
    slots = [road_cx - road_w / 2 + 1.1, road_cx + road_w / 2 - 1.1]  # parking
    slots += [road_cx - road_w / 2 + lane_w * (i + 0.5) for i in range(n_lanes)]
    taken = {k: [] for k in range(len(slots))}
    n = int(rng.integers(prm.n_cars[0], prm.n_cars[1] + 1))
    for _ in range(n):
        for _try in range(10):
            k = int(rng.integers(len(slots)))
            van = rng.uniform() < 0.15
            half_len = rng.uniform(2.6, 3.2) if van else rng.uniform(1.9, 2.4)
            zc = rng.uniform(4.0 + half_len, z_end - 6.0)
            if all(abs(zc - z0) > half_len + h0 + 0.6 for z0, h0 in taken[k]):
                break
        else:
            continue
        # the camera's own car occupies x near 0, z < 4: keep clear of it
        taken[k].append((zc, half_len))
        xc = slots[k] + rng.uniform(-0.2, 0.2)
        yaw = rng.uniform(-0.04, 0.04) + (math.pi if rng.uniform() < 0.5 else 0.0)
        paint = np.asarray(_CAR_PAINT[rng.integers(len(_CAR_PAINT))]) * rng.uniform(0.85, 1.05)
        body = _Flat(np.clip(paint, 0, 1), lattice, 0.04, 1.0)
        glass = _Flat(np.array([0.2, 0.24, 0.3]) * rng.uniform(0.6, 1.2), lattice, 0.3, 0.5)
        dark = _Flat((0.04, 0.04, 0.04), lattice, 0.1, 0.3)
        hw = rng.uniform(0.85, 1.0)
        if van:
            bh = rng.uniform(0.9, 1.2)
            parts = [
                (_Box((xc, 0.35 + bh, zc), (hw, bh, half_len), yaw, None), body),
                (_Box((xc, 0.2, zc), (hw - 0.1, 0.2, half_len - 0.5), yaw, None), dark),
            ]
        else:
            bh = rng.uniform(0.3, 0.4)
            ch = rng.uniform(0.25, 0.35)
            back = rng.uniform(-0.4, 0.1)
            off = np.array([math.sin(yaw), 0, math.cos(yaw)]) * back
            cab_len = half_len * rng.uniform(0.45, 0.6)
            parts = [
                (_Box((xc, 0.3 + bh, zc), (hw, bh, half_len), yaw, None), body),
                (
                    _Box(
                        (xc + off[0], 0.3 + 2 * bh + ch, zc + off[2]),
                        (hw - 0.1, ch, cab_len),
                        yaw,
                        None,
                    ),
                    glass,
                ),
                (_Box((xc, 0.2, zc), (hw - 0.1, 0.2, half_len - 0.4), yaw, None), dark),
            ]
        objs.add_object("van" if van else "car", parts)


def _build_street(rng, lattice, prm: StreetParams):
    road_w = rng.uniform(*prm.road_width)
    walk_w = rng.uniform(*prm.sidewalk_width)
    back = rng.uniform(*prm.backdrop_distance)
    road_cx = -road_w * rng.uniform(0.1, 0.25)  # the camera drives right of the centre line
    left_curb, right_curb = road_cx - road_w / 2, road_cx + road_w / 2
    objs = _Objects()
    objs.add_surface(
        _Plane((0, 1, 0), 0.0, ROAD_ID, (0, 2)), _Asphalt(rng, lattice, road_cx, road_w)
    )
    # sidewalks run 40 m outwards so that they also floor the alleys between buildings
    z0, z1 = -20.0, back
    for side, curb, inst in ((-1, left_curb, LEFT_SIDEWALK_ID), (1, right_curb, RIGHT_SIDEWALK_ID)):
        half = (20.0, _CURB / 2, (z1 - z0) / 2)
        center = (curb + side * 20.0, _CURB / 2, (z0 + z1) / 2)
        objs.add_surface(_Box(center, half, 0.0, inst), _Paving(rng, lattice, curb_x=-side * 20.0))
    z_end = back - 16.0
    max_height = rng.uniform(8.0, 35.0)  # from a suburb to downtown
    for side, curb in ((-1, left_curb), (1, right_curb)):
        _buildings(rng, lattice, objs, side, curb + side * walk_w, z_end, max_height)
    for side, curb in ((-1, left_curb), (1, right_curb)):
        _street_furniture(rng, lattice, objs, side, curb, walk_w, z_end)
    _cars(rng, lattice, objs, prm, road_cx, road_w, z_end)
    _skyline(rng, lattice, objs, back)
    street = dict(
        road_width=road_w,
        road_center_x=road_cx,
        sidewalk_width=walk_w,
        curb_height=_CURB,
        backdrop_distance=back,
        side_sky=_SIDE_SKY,
    )
    return objs, street


def _sky_planes():
    """Far wall is added by the caller; the side walls, a lid and a wall behind the camera."""
    return [
        _Plane((1, 0, 0), -_SIDE_SKY, SKY_ID, (2, 1)),
        _Plane((-1, 0, 0), -_SIDE_SKY, SKY_ID, (2, 1)),
        _Plane((0, -1, 0), -150.0, SKY_ID, (0, 2)),
        _Plane((0, 0, 1), -25.0, SKY_ID, (0, 1)),
    ]


def render_street(seed: int, params: StreetParams | None = None) -> Scene:
    """Render one random street, fully determined by `seed` (and `params`)."""
    prm = params or StreetParams()
    if prm.height < 1 or prm.width < 1:
        raise ValueError(f"image size must be positive, got {prm.height}x{prm.width}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x57EE7]))
    lattice = rng.uniform(0, 1, size=(16, 16, 16)).astype(np.float32)
    objs, street = _build_street(rng, lattice, prm)
    pos, d, cam = _camera(rng, prm, dict(ceiling=False, width=2.0 / 0.3))

    # sun: low, any azimuth; warm (evening) to cool (hazy noon) colour; on an overcast day
    # weak (soft shadows) under a bright grey sky
    el = math.radians(rng.uniform(8.0, 40.0))
    az = rng.uniform(0.0, 2 * math.pi)
    ldir = np.array(
        [math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az)], np.float32
    )
    warm = rng.uniform()
    sun = warm * np.array([1.25, 1.0, 0.7]) + (1 - warm) * np.array([1.0, 1.02, 1.08])
    sun = sun.astype(np.float32)
    skylight = rng.uniform(0.22, 0.4) * np.array([0.85, 0.95, 1.15])
    overcast = rng.uniform() < 0.25
    if overcast:
        sun, skylight = 0.25 * sun, 1.8 * skylight
    sun, skylight = sun.astype(np.float32), skylight.astype(np.float32)
    haze_col = (0.75 * np.array([0.8, 0.85, 0.95]) + 0.25 * sun / sun.max()).astype(np.float32)
    haze_len = np.float32(rng.uniform(80.0, 300.0))
    exposure = np.float32(rng.uniform(0.9, 1.15))

    sky = _Sky(rng, lattice, pos, haze_col, overcast)
    back = street["backdrop_distance"]
    planes = [_Plane((0, 0, -1), -back, SKY_ID, (0, 1)), *_sky_planes()]
    prims = objs.prims + planes
    mats = objs.mats + [sky] * len(planes)

    H, W = prm.height, prm.width
    t, p, normals, rgb, inst, _ = _hit_surfaces(prims, mats, pos, d, cam, H, W, f"street {seed}")
    is_sky = inst == SKY_ID
    normals[is_sky] = 0  # the sky is not lit: no shadow rays from it
    shade = _sun_shading(objs.casters, p, normals, ldir, prm.shadows)
    col = rgb * (skylight + shade[:, None] * sun) * exposure
    fog = 1.0 - np.exp(-np.clip(t - 15.0, 0, None) / haze_len)
    col = col * (1 - fog[:, None]) + haze_col * fog[:, None]
    col[is_sky] = rgb[is_sky]  # the sky is its own light, already horizon-hazed
    img = np.clip(col, 0, 1) ** (1 / 1.8)
    image = (img * 255 + 0.5).astype(np.uint8).reshape(H, W, 3)
    meta = dict(
        seed=int(seed),
        family="street",
        camera=cam,
        street=street,
        sun=dict(direction=ldir.tolist(), color=sun.tolist(), overcast=bool(overcast)),
        objects=objs.meta,
    )
    depth = t.reshape(H, W).astype(np.float32)
    if not prm.sky_depth:
        depth[is_sky.reshape(H, W)] = 0.0
    return Scene(
        image=image,
        depth=depth,
        instances=inst.reshape(H, W),
        meta=meta,
    )


def preview(seeds=(0, 1, 2, 3), size: int = 252) -> np.ndarray:
    """(len(seeds) * size, 3 * size, 3) uint8 grid: per street its image, its depth (log
    scale, near bright, 1-85 m) and its instance map (a random colour per id).

    docs/images/streets.png is ``PIL.Image.fromarray(preview())``.
    """
    from westar.evaluate import colorize

    palette = np.random.default_rng(0).integers(40, 256, size=(4096, 3)).astype(np.uint8)
    rows = []
    for s in seeds:
        sc = render_street(s, StreetParams(height=size, width=size))
        depth = colorize(-np.log(sc.depth), -math.log(85.0), 0.0)
        rows.append(np.concatenate([sc.image, depth, palette[sc.instances % 4096]], axis=1))
    return np.concatenate(rows, axis=0)
