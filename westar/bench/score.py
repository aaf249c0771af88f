"""Scoring the source model on the benchmark: `evaluate_source(root, model_dir, ...)`.

Protocol of westar.evaluate (its `image_metrics`: per image least-squares scale and shift
in disparity, AbsRel and delta1), averaged over the images of a test split; then mean and
standard deviation over seeds. Each shifted domain is compared with the clean one of the
same seed: ratio = AbsRel_shift / AbsRel_clean, drop = 100 * (delta1_clean - delta1_shift).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import frozen as D
from .build import split_dir, write_json

__all__ = ["evaluate_source", "load_split", "Predictor", "score", "hurts", "format_markdown"]


def load_split(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(stems, images (N,H,W,3) uint8, depths (N,H,W) float32) of a folder with depth/."""
    from westar.synth import list_stems, read_sample

    if not (folder / "images").is_dir():
        raise FileNotFoundError(f"{folder}: benchmark split not built (run westar bench)")
    stems = list_stems(folder)
    samples = [read_sample(folder, s) for s in stems]
    if any(d is None for _, d, _ in samples):
        raise FileNotFoundError(f"{folder}/depth: ground-truth depth missing")
    return stems, np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])


class Predictor:
    """The source model, loaded once: `predictor(images uint8 (N,H,W,3))` -> (N,H,W)."""

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        device: str | None = None,
        progress: bool = True,
    ):
        import torch
        from transformers.utils import logging as hf_logging

        from westar.model import load_depth_model

        if model_dir is None:
            from westar.synth import source_model_path

            model_dir = source_model_path()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: --model is not a model folder (no config.json)")
        self.path = model_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bar = hf_logging.is_progress_bar_enabled()
        if not progress:  # transformers' "Loading weights" bar
            hf_logging.disable_progress_bar()
        try:
            self.dm = load_depth_model(str(model_dir), local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.dm.check_size((D.SIZE, D.SIZE), "benchmark image size")
        self.net = self.dm.model.to(self.device).eval()

    def __call__(self, images: np.ndarray, batch: int = 16) -> np.ndarray:
        import torch

        from westar.model import predict

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i : i + batch]).float().div(255).permute(0, 3, 1, 2)
                out.append(predict(self.net, self.dm, x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)


def score(preds: np.ndarray, depths: np.ndarray, max_depth: float) -> dict[str, Any]:
    """Mean AbsRel / delta1 over images (westar.evaluate.image_metrics), and per image."""
    from westar.evaluate import image_metrics

    per = [image_metrics(p, g, max_depth) for p, g in zip(preds, depths, strict=True)]
    ok = [m for m in per if m is not None]
    if not ok:
        raise ValueError("no image with valid ground-truth depth")
    return {
        "abs_rel": float(np.mean([m["abs_rel"] for m in ok])),
        "delta1": float(np.mean([m["delta1"] for m in ok])),
        "images": len(ok),
        "per_image": per,
    }


def hurts(ratio: float, drop: float) -> bool:
    """The benchmark's criterion for a shift that hurts the source (the 1e-9 keeps a value
    on the threshold, e.g. 0.15 / 0.10, from failing by a rounding error)."""
    return bool(ratio >= D.HURT_RATIO - 1e-9 or drop >= D.HURT_DELTA1_DROP - 1e-9)


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def evaluate_source(
    root: str | os.PathLike = "runs/bench/data",
    model_dir: str | os.PathLike | None = None,
    *,
    seeds: Iterable[int] | None = None,
    domains: Iterable[str] | None = None,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    figures: bool = True,
    command: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Source model on every (domain, seed) test split under `root`; "clean" is always
    included (the reference). With `out`: bench.json, bench.md and figures/ there."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    seeds = list(D.QUICK_SEEDS if quick else D.SEEDS) if seeds is None else list(seeds)
    domains = list(D.QUICK_DOMAINS if quick else D.DOMAINS) if domains is None else list(domains)
    domains = ["clean"] + [d for d in domains if d != "clean"]
    predictor = Predictor(model_dir, device, progress)
    per: dict[str, dict[int, dict]] = {d: {} for d in domains}
    shown: dict[str, tuple] = {}  # domain -> (images, depths, preds, per-image) of seeds[0]
    n_fig = 4
    for domain in tqdm(domains, desc="bench: evaluate source", disable=not progress):
        for seed in seeds:
            _, images, depths = load_split(split_dir(root, domain, seed, "test"))
            preds = predictor(images)
            m = score(preds, depths, D.MAX_DEPTH[domain])
            per[domain][seed] = m
            if seed == seeds[0]:
                shown[domain] = (images[:n_fig], depths[:n_fig], preds[:n_fig], m["per_image"])
    results: dict[str, Any] = {}
    for domain in domains:
        by_seed = per[domain]
        entry = {
            "family": D.family(domain),
            "corruption": D.corruption(domain),
            "severity": D.severity(domain),
            "max_depth": D.MAX_DEPTH[domain],
            "per_seed": {
                str(s): {k: m[k] for k in ("abs_rel", "delta1", "images")}
                for s, m in by_seed.items()
            },
            "abs_rel": _mean_std([m["abs_rel"] for m in by_seed.values()]),
            "delta1": _mean_std([m["delta1"] for m in by_seed.values()]),
        }
        if domain != "clean":
            clean = per["clean"]
            ratios = [by_seed[s]["abs_rel"] / clean[s]["abs_rel"] for s in seeds]
            drops = [100.0 * (clean[s]["delta1"] - by_seed[s]["delta1"]) for s in seeds]
            entry["abs_rel_ratio"] = _mean_std(ratios)
            entry["delta1_drop_points"] = _mean_std(drops)
            entry["hurts"] = hurts(float(np.mean(ratios)), float(np.mean(drops)))
        results[domain] = entry
    report = {
        "benchmark": D.definition(quick),
        "model": str(predictor.path),
        "root": str(root),
        "seeds": seeds,
        "command": command,
        "criterion": f"hurts = AbsRel ratio >= {D.HURT_RATIO} or delta1 drop >= "
        f"{D.HURT_DELTA1_DROP:g} points (means over seeds of the per-seed values)",
        "clean": {k: results["clean"][k] for k in ("abs_rel", "delta1")},
        "domains": results,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        out = Path(out)
        write_json(out / "bench.json", report)
        _write_text(out / "bench.md", format_markdown(report))
        if figures:
            from .figures import bar_chart, domain_figure

            for domain, (images, depths, preds, metrics) in shown.items():
                domain_figure(
                    out / "figures" / f"{domain}.png",
                    f"{domain} (seed {seeds[0]}, test)",
                    images,
                    depths,
                    preds,
                    metrics,
                    D.MAX_DEPTH[domain],
                )
            bar_chart(out / "figures" / "bars.png", report)
    return report


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _pm(x: dict[str, float], fmt: str = ".4f") -> str:
    return f"{x['mean']:{fmt}} ± {x['std']:{fmt}}"


def format_markdown(report: dict[str, Any]) -> str:
    """bench.md: the table of the source model on every domain, with its command."""
    lines = [
        "# westar bench: the source model on the frozen benchmark",
        "",
        f"Command: `{report['command'] or 'westar.bench.evaluate_source(...)'}`  ",
        f"Model: `{report['model']}`  ",
        f"Seeds: {', '.join(map(str, report['seeds']))}; test split of each "
        f"({report['benchmark']['split_sizes']['test']} images, "
        f"{report['benchmark']['size']} px){' - QUICK (CI) sizes' if report['benchmark']['quick'] else ''}.  ",
        "Protocol: per image least-squares scale and shift in disparity, AbsRel and δ1, "
        "mean over images; mean ± std over seeds. Ratio and drop against `clean` (the same "
        f"scenes, uncorrupted). {report['criterion']}.",
        "",
        "| domain | shift | AbsRel | δ1 | AbsRel / clean | δ1 drop (pts) | hurts |",
        "|---|---|---|---|---|---|---|",
    ]
    for domain, r in report["domains"].items():
        if domain == "clean":
            kind, ratio, drop, hurt = "none (reference)", "1", "0", "-"
        else:
            kind = (
                f"{r['corruption']}, severity {r['severity']}"
                if r["corruption"]
                else "natural: streets (unseen family)"
            )
            ratio = _pm(r["abs_rel_ratio"], ".2f")
            drop = _pm(r["delta1_drop_points"], ".1f")
            hurt = "**yes**" if r["hurts"] else "no"
        lines.append(
            f"| {domain} | {kind} | {_pm(r['abs_rel'])} | {_pm(r['delta1'])} | {ratio} | "
            f"{drop} | {hurt} |"
        )
    lines += [
        "",
        "Per-shift pictures (input | ground truth | source, aligned disparity): "
        + ", ".join(f"`figures/{d}.png`" for d in report["domains"])
        + "; bar chart: `figures/bars.png`.",
        "",
    ]
    return "\n".join(lines)
