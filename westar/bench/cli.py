"""`westar bench`: build the frozen benchmark, evaluate the source model, write the table
and the pictures (or, with --calibrate, the corruption-severity table)."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from . import frozen as D

__all__ = ["CLI_HELP", "cli_arguments", "cli_run"]

CLI_HELP = "the frozen benchmark: build its domains, score the source (table, pictures)"


def cli_arguments(p: argparse.ArgumentParser) -> None:
    from westar.cli_flags import DEVICE_HELP, MODEL_HELP, deprecated_alias, model_name

    p.add_argument("--data", help="dataset folder (default: runs/bench/data; --quick: "
                   "runs/bench/quick/data)")  # fmt: skip
    deprecated_alias(p, "--root", "--data", "data")
    p.add_argument("--out", help="results folder (default: runs/bench; --quick: runs/bench/quick)")
    p.add_argument("--model", type=model_name, help=MODEL_HELP + " (default: source)")
    p.add_argument("--seeds", nargs="+", metavar="K",
                   help=f"benchmark seeds to build and score (default: {' '.join(map(str, D.SEEDS))})")  # fmt: skip
    p.add_argument("--domains", nargs="+", metavar="NAME",
                   help=f"subset of: {' '.join(D.DOMAINS)} (default: all; clean is always scored)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="CI's tiny version: 4 images per split, seed 0, clean/fog/streets")  # fmt: skip
    p.add_argument("--calibrate", action="store_true",
                   help="only the severity table of every corruption x severity 1..5 "
                   "(calibration split) and the smallest severity that hurts")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild split folders built under another definition")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--num-workers", help="processes building the data (default: 1)")
    deprecated_alias(p, "--workers", "--num-workers", "num_workers")
    p.add_argument("--device", help=DEVICE_HELP)


def _seeds(values: list[str] | None, quick: bool) -> list[int]:
    if values is None:
        return list(D.QUICK_SEEDS if quick else D.SEEDS)
    seeds = []
    for v in values:
        try:
            s = int(v)
        except ValueError:
            raise ValueError(f"--seeds: {v!r} is not an integer") from None
        if s not in D.SEEDS:
            raise ValueError(f"--seeds: {s} is not a benchmark seed (one of {D.SEEDS})")
        if s not in seeds:
            seeds.append(s)
    return seeds


def _domains(values: list[str] | None, quick: bool) -> list[str]:
    if values is None:
        return list(D.QUICK_DOMAINS if quick else D.DOMAINS)
    for v in values:
        if v not in D.DOMAINS:
            raise ValueError(f"--domains: unknown domain {v!r}; one of {', '.join(D.DOMAINS)}")
    wanted = set(values) | {"clean"}  # the reference of every ratio
    return [d for d in D.DOMAINS if d in wanted]


def _workers(value: str | None) -> int:
    if value is None:
        return 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--num-workers: must be a positive integer, got {value!r}")
    return n


def _folder_arg(flag: str, path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, f"{flag} exists and is not a folder", str(path))
    return path


def _model_arg(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(2, "--model is not a model folder (no config.json)", str(path))
    return path


def cli_run(args: argparse.Namespace) -> int:
    from .build import build
    from .calibrate import calibrate
    from .score import evaluate_source

    t0 = time.perf_counter()
    quick = args.quick
    # every argument is checked before any work
    seeds = _seeds(args.seeds, quick)
    domains = _domains(args.domains, quick)
    workers = _workers(args.num_workers)
    model = _model_arg(args.model)
    sub = "runs/bench/quick" if quick else "runs/bench"
    out = _folder_arg("--out", Path(args.out or sub))
    root = _folder_arg("--data", Path(args.data or f"{sub}/data"))
    progress = not args.no_progress
    words = ["westar", "bench"]
    if args.calibrate:
        words += ["--calibrate", "--out", str(out)] + (["--quick"] if quick else [])
        words += ["--model", str(model)] if model else []
        report = calibrate(
            model,
            out,
            images=4 if quick else D.CALIBRATION_IMAGES,
            command=shlex.join(words),
            device=args.device,
            progress=progress,
        )
        print((out / "calibration.md").read_text())
        print(f"calibration: {out / 'calibration.json'}, {out / 'calibration.md'} "
              f"({report['wall_seconds']:.0f} s)")  # fmt: skip
        return 0
    words += ["--data", str(root), "--out", str(out)] + (["--quick"] if quick else [])
    words += ["--seeds", *map(str, seeds), "--domains", *domains]
    words += ["--model", str(model)] if model else []
    manifest = build(
        root,
        seeds=seeds,
        domains=domains,
        quick=quick,
        overwrite=args.overwrite,
        progress=progress,
        workers=workers,
    )
    report = evaluate_source(
        root,
        model,
        seeds=seeds,
        domains=domains,
        quick=quick,
        out=out,
        command=shlex.join(words),
        device=args.device,
        progress=progress,
    )
    print((out / "bench.md").read_text())
    print(f"data: {root} ({len(manifest['splits'])} split folders, manifest.json)")
    print(f"results: {out / 'bench.json'}, {out / 'bench.md'}, {out / 'figures'}")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    hurt = [d for d, r in report["domains"].items() if d != "clean" and not r["hurts"]]
    if hurt:
        print(f"note: these shifts do not hurt the source by the criterion: {', '.join(hurt)}")
    return 0
