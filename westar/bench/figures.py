"""The benchmark's pictures, drawn with PIL (matplotlib is not a dependency).

- `domain_figure`: a few test images of one domain, input | ground truth | source
  prediction (disparity after the per-image least-squares alignment, both on the colour
  ramp of westar.evaluate.colorize with the ground truth's 2-98 % range: same colours,
  same depths).
- `bar_chart`: clean vs shifted AbsRel and delta1 per domain, seed spread as error bars.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["domain_figure", "bar_chart"]

_BLACK, _GREY, _WHITE = (0, 0, 0), (150, 150, 150), (255, 255, 255)
_CLEAN, _SHIFT = (120, 160, 200), (215, 95, 60)


def _save(canvas: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    canvas.save(tmp)
    tmp.replace(path)


def domain_figure(
    path: str | os.PathLike,
    title: str,
    images: np.ndarray,
    depths: np.ndarray,
    preds: np.ndarray,
    metrics: list[dict | None],
    max_depth: float,
    zoom: int = 2,
) -> None:
    """PNG grid, one row per image: input | ground truth | source (aligned disparity)."""
    from westar.evaluate import colorize

    n, h, w = len(images), images.shape[1] * zoom, images.shape[2] * zoom
    head, label = 30, 14
    canvas = Image.new("RGB", (3 * w, head + n * (h + label)), _WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=_BLACK)
    for j, t in enumerate(("input", "ground truth", "source (aligned)")):
        draw.text((j * w + 4, 16), t, fill=_BLACK)
    for i in range(n):
        gt = depths[i]
        mask = np.isfinite(gt) & (gt > 1e-3) & (gt <= max_depth)
        gt_disp = np.where(mask, 1.0 / np.where(mask, gt, 1.0), 0.0)
        lo, hi = np.percentile(gt_disp[mask], [2, 98]) if mask.any() else (0.0, 1.0)
        m = metrics[i]
        aligned = m["scale"] * preds[i] + m["shift"] if m else np.zeros_like(gt_disp)
        row = np.concatenate(
            [images[i], colorize(gt_disp, lo, hi, mask), colorize(aligned, lo, hi)], axis=1
        )
        y = head + i * (h + label)
        canvas.paste(Image.fromarray(row).resize((3 * w, h), Image.NEAREST), (0, y))
        text = f"AbsRel {m['abs_rel']:.3f}  delta1 {m['delta1']:.3f}" if m else "no valid depth"
        draw.text((2 * w + 4, y + h + 1), text, fill=_BLACK)
    _save(canvas, Path(path))


def _panel(draw, box, title, domains, clean, shifted, top, fmt):
    """One bar panel: per domain a clean bar and a shifted bar (mean, std error bars)."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 26), title, fill=_BLACK)
    draw.line((x0, y1, x1, y1), fill=_BLACK)
    draw.line((x0, y0, x0, y1), fill=_BLACK)
    for k in range(5):  # y ticks
        v = top * k / 4
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0 - 4, y, x0, y), fill=_BLACK)
        draw.line((x0 + 1, y, x1, y), fill=(230, 230, 230))
        draw.text((x0 - 44, y - 6), f"{v:{fmt}}", fill=_BLACK)
    group = (x1 - x0) / max(1, len(domains))
    bar = group * 0.32

    def one(xl, stat, colour):
        ht = (y1 - y0) * min(stat["mean"], top) / top
        draw.rectangle((xl, y1 - ht, xl + bar, y1 - 1), fill=colour)
        if stat.get("std", 0) > 0:
            xc = xl + bar / 2
            lo = y1 - (y1 - y0) * min(stat["mean"] - stat["std"], top) / top
            hi = y1 - (y1 - y0) * min(stat["mean"] + stat["std"], top) / top
            draw.line((xc, lo, xc, hi), fill=_BLACK, width=1)
            draw.line((xc - 3, lo, xc + 3, lo), fill=_BLACK)
            draw.line((xc - 3, hi, xc + 3, hi), fill=_BLACK)

    for k, domain in enumerate(domains):
        gx = x0 + k * group + group * 0.15
        one(gx, clean, _CLEAN)
        if domain != "clean":
            one(gx + bar + 2, shifted[domain], _SHIFT)
        for j, part in enumerate(domain.split("_")):
            draw.text((x0 + k * group + 4, y1 + 4 + 11 * j), part, fill=_BLACK)


def bar_chart(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """figures/bars.png: AbsRel (left) and delta1 (right), clean vs each shifted domain."""
    domains = list(report["domains"])
    res = report["domains"]
    group, margin = 64, 56
    pw, ph = max(260, group * len(domains)), 220
    canvas = Image.new("RGB", (2 * (pw + margin) + 20, ph + 90), _WHITE)
    draw = ImageDraw.Draw(canvas)
    seeds = ", ".join(map(str, report["seeds"]))
    draw.text((margin, 6), f"source model: clean vs shifted (mean, std over seeds {seeds})",
              fill=_BLACK)  # fmt: skip
    draw.rectangle((margin + 300, 6, margin + 310, 16), fill=_CLEAN)
    draw.text((margin + 314, 6), "clean (reference)", fill=_BLACK)
    draw.rectangle((margin + 430, 6, margin + 440, 16), fill=_SHIFT)
    draw.text((margin + 444, 6), "shifted domain", fill=_BLACK)
    top_abs = max(r["abs_rel"]["mean"] + r["abs_rel"]["std"] for r in res.values())
    top_abs = float(np.ceil(top_abs * 1.1 * 5) / 5) or 0.2  # ticks at multiples of 0.05
    for i, (key, title, top, fmt) in enumerate(
        (("abs_rel", "AbsRel (lower is better)", top_abs, ".2f"),
         ("delta1", "delta1 (higher is better)", 1.0, ".2f"))
    ):  # fmt: skip
        x0 = margin + i * (pw + margin + 20)
        _panel(
            draw,
            (x0, 50, x0 + pw, 50 + ph),
            title,
            domains,
            res["clean"][key],
            {d: r[key] for d, r in res.items()},
            top,
            fmt,
        )
    _save(canvas, Path(path))
