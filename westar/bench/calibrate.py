"""`westar bench --calibrate`: how much each corruption at each severity hurts the source.

Evaluates the source model on the calibration split (CALIBRATION_IMAGES rooms scenes of
their own seed block, never a train/val/test scene) clean and at every corruption x
severity 1..5, and picks per corruption the smallest severity that meets the benchmark's
criterion (AbsRel >= 1.5x clean, or delta1 down >= 10 points), "none" if none does. It
never writes SEVERITIES: a human pastes the printed line into westar/bench/frozen.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import frozen as D
from .build import write_json
from .score import Predictor, _write_text, hurts, score

__all__ = ["calibration_scenes", "calibrate", "pick_severities", "severities_line"]

SEVERITY_LEVELS = (1, 2, 3, 4, 5)


def calibration_scenes(n: int = D.CALIBRATION_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n,H,W,3), depths (n,H,W)) of the first n clean calibration scenes."""
    from westar.synth import render

    scenes = [render("room", s, D.SIZE, D.SIZE) for s in D.calibration_seeds(n)]
    return np.stack([s.image for s in scenes]), np.stack([s.depth for s in scenes])


def pick_severities(
    clean: dict[str, float], table: dict[str, dict[int, dict[str, float]]]
) -> dict[str, int | str]:
    """Per corruption, the smallest severity whose {"abs_rel", "delta1"} meets the
    criterion against `clean`, or "none"."""
    chosen: dict[str, int | str] = {}
    for corr, by_sev in table.items():
        chosen[corr] = "none"
        for sev in sorted(int(s) for s in by_sev):
            m = by_sev[sev] if sev in by_sev else by_sev[str(sev)]
            ratio = m["abs_rel"] / clean["abs_rel"]
            drop = 100.0 * (clean["delta1"] - m["delta1"])
            if hurts(ratio, drop):
                chosen[corr] = sev
                break
    return chosen


def severities_line(chosen: dict[str, int | str]) -> str:
    """The line to paste into definition.py ("none" stays 5, flagged in a comment)."""
    values = ", ".join(f'"{c}": {5 if s == "none" else s}' for c, s in chosen.items())
    none = [c for c, s in chosen.items() if s == "none"]
    note = f"  # none meets the criterion: {', '.join(none)}" if none else ""
    return f"SEVERITIES = {{{values}}}{note}"


def calibrate(
    model_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = "runs/bench",
    *,
    images: int = D.CALIBRATION_IMAGES,
    corruptions: tuple[str, ...] = D.CALIBRATED_CORRUPTIONS,
    device: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The full clean-vs-corrupted table; with `out`, calibration.json and .md there."""
    from tqdm.auto import tqdm

    from westar.corrupt import corrupt_image

    t0 = time.perf_counter()
    predictor = Predictor(model_dir, device, progress)
    imgs, depths = calibration_scenes(images)
    cap = D.MAX_DEPTH["clean"]

    def metrics(x):
        m = score(predictor(x), depths, cap)
        return {"abs_rel": m["abs_rel"], "delta1": m["delta1"], "images": m["images"]}

    clean = metrics(imgs)
    table: dict[str, dict[int, dict]] = {}
    work = [(c, s) for c in corruptions for s in SEVERITY_LEVELS]
    for corr, sev in tqdm(work, desc="bench: calibrate", disable=not progress):
        shifted = np.stack(
            [
                corrupt_image(
                    im, corr, sev, seed=D.noise_seed(corr, "cal", "calibration", i), depth=dp
                )  # fmt: skip
                for i, (im, dp) in enumerate(zip(imgs, depths, strict=True))
            ]
        )
        m = metrics(shifted)
        m["abs_rel_ratio"] = m["abs_rel"] / clean["abs_rel"]
        m["delta1_drop_points"] = 100.0 * (clean["delta1"] - m["delta1"])
        m["meets"] = hurts(m["abs_rel_ratio"], m["delta1_drop_points"])
        table.setdefault(corr, {})[sev] = m
    chosen = pick_severities(clean, table)
    seeds = D.calibration_seeds(images)
    report = {
        "model": str(predictor.path),
        "command": command,
        "scene_seeds": [seeds.start, seeds.stop],
        "images": images,
        "criterion": f"AbsRel ratio >= {D.HURT_RATIO} or delta1 drop >= "
        f"{D.HURT_DELTA1_DROP:g} points",
        "clean": clean,
        "table": {c: {str(s): m for s, m in t.items()} for c, t in table.items()},
        "chosen": chosen,
        "severities_line": severities_line(chosen),
        "current_severities": dict(D.SEVERITIES),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        write_json(Path(out) / "calibration.json", report)
        _write_text(Path(out) / "calibration.md", format_calibration(report))
    return report


def format_calibration(report: dict[str, Any]) -> str:
    c = report["clean"]
    lines = [
        "# westar bench --calibrate: corruption severity vs the source model",
        "",
        f"Command: `{report['command'] or 'westar.bench.calibrate(...)'}`  ",
        f"Model: `{report['model']}`  ",
        f"Calibration split: {report['images']} clean rooms scenes, seeds "
        f"{report['scene_seeds'][0]}..{report['scene_seeds'][1] - 1} (never a benchmark "
        f"train/val/test scene). Criterion: {report['criterion']}.",
        "",
        f"Clean: AbsRel {c['abs_rel']:.4f}, δ1 {c['delta1']:.4f}.",
        "",
        "| corruption | severity | AbsRel | δ1 | AbsRel / clean | δ1 drop (pts) | meets |",
        "|---|---|---|---|---|---|---|",
    ]
    for corr, by_sev in report["table"].items():
        for sev, m in by_sev.items():
            lines.append(
                f"| {corr} | {sev} | {m['abs_rel']:.4f} | {m['delta1']:.4f} | "
                f"{m['abs_rel_ratio']:.2f} | {m['delta1_drop_points']:.1f} | "
                f"{'yes' if m['meets'] else 'no'} |"
            )
    lines += ["", "Smallest severity meeting the criterion:", ""]
    lines += [f"- {corr}: {sev}" for corr, sev in report["chosen"].items()]
    lines += [
        "",
        "To adopt them, paste this line into `westar/bench/frozen.py` (a human decision; "
        "this command never changes the benchmark), then rebuild with `--overwrite`:",
        "",
        "```python",
        report["severities_line"],
        "```",
        "",
    ]
    return "\n".join(lines)
