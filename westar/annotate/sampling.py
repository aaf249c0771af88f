"""Where to ask: structured samples (an anchor and two candidate points) per image.

Each sample gives three pairs, asked in this order (slot 0, 1, 2):

    (p, anchor), (q, anchor), (p, q)

as in `westar pairs` (farther/anchor, closer/anchor, farther/closer), except that the
person, not a depth map, decides the relations. Points are pixel [x, y] (x = column,
y = row, 0-based) of the original image.

The default proposal spreads all 3 * samples points over the image (farthest-point
sampling of random candidates, away from the border). With a score map (e.g. where a
teacher and a student model disagree, `westar.annotate.guide`) the same sampling is
weighted by the score, so the points land where an answer is most informative.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["PAIR_SLOTS", "POINT_NAMES", "propose_samples", "image_rng"]

POINT_NAMES = ("anchor", "p", "q")
PAIR_SLOTS = (("p", "anchor"), ("q", "anchor"), ("p", "q"))  # (point a, point b) per slot


def image_rng(seed: int, stem: str) -> np.random.Generator:
    """The generator for one image: depends only on (seed, stem), like `westar pairs`."""
    return np.random.default_rng([seed, zlib.crc32(stem.encode())])


def _farthest_points(
    candidates: np.ndarray, count: int, weight: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Greedy farthest-point choice of `count` rows of candidates (N, 2) float pixels.

    With `weight` (N,) in [0, 1], each step maximises distance * (0.1 + weight): far
    from the points already taken and where the score is high.
    """
    n = len(candidates)
    boost = np.ones(n) if weight is None else 0.1 + weight
    first = int(rng.integers(n)) if weight is None else int(np.argmax(boost))
    chosen = [first]
    dist = np.linalg.norm(candidates - candidates[first], axis=1)
    for _ in range(count - 1):
        nxt = int(np.argmax(dist * boost))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(candidates - candidates[nxt], axis=1))
    return candidates[chosen]


def propose_samples(
    width: int,
    height: int,
    samples: int,
    rng: np.random.Generator,
    score: np.ndarray | None = None,
    margin: float = 0.06,
) -> list[dict[str, list[int]]]:
    """`samples` dicts {"anchor", "p", "q": [x, y]} spread over a width x height image.

    score: optional (height, width) float map, larger = more informative; NaN/inf are
    treated as 0. The anchor of each sample is the point nearest the image centre of its
    triple's mean, so that p and q lie on either side of it when possible. Deterministic
    given rng's state. Images of fewer than 3 pixels repeat points.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if samples < 1:
        return []
    count = 3 * samples
    mx, my = margin * (width - 1), margin * (height - 1)
    n_cand = max(64 * count, 512)
    xs = rng.uniform(mx, width - 1 - mx, n_cand)
    ys = rng.uniform(my, height - 1 - my, n_cand)
    cand = np.stack([xs, ys], axis=1)
    weight = None
    if score is not None:
        score = np.asarray(score, dtype=np.float64)
        if score.shape != (height, width):
            raise ValueError(f"score map is {score.shape}, expected ({height}, {width})")
        score = np.where(np.isfinite(score), score, 0.0)
        s = score[np.rint(ys).astype(int), np.rint(xs).astype(int)]
        span = s.max() - s.min()
        weight = (s - s.min()) / span if span > 0 else None
    pts = np.rint(_farthest_points(cand, count, weight, rng)).astype(int)
    pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
    order = rng.permutation(count)
    out = []
    for k in range(samples):
        tri = pts[order[3 * k : 3 * k + 3]]
        mid = tri.mean(axis=0)
        a = int(np.argmin(np.linalg.norm(tri - mid, axis=1)))
        rest = [i for i in range(3) if i != a]
        p, q = tri[rest[0]], tri[rest[1]]
        anchor = tri[a]
        if width * height > 1:  # never ask about a point against itself
            if tuple(p) == tuple(anchor):
                p = _nudge(p, width, height)
            if tuple(q) == tuple(anchor) or tuple(q) == tuple(p):
                q = _nudge(q, width, height, avoid={tuple(anchor), tuple(p)})
        out.append(
            {"anchor": [int(v) for v in anchor], "p": [int(v) for v in p], "q": [int(v) for v in q]}
        )
    return out


def _nudge(pt, width: int, height: int, avoid: set | None = None) -> np.ndarray:
    """The nearest pixel to pt (growing square rings) not in `avoid` (tiny images only)."""
    avoid = avoid or {tuple(pt)}
    x0, y0 = int(pt[0]), int(pt[1])
    for r in range(1, max(width, height)):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                x, y = x0 + dx, y0 + dy
                if max(abs(dx), abs(dy)) == r and 0 <= x < width and 0 <= y < height:
                    if (x, y) not in avoid:
                        return np.array([x, y])
    return np.array(pt)
