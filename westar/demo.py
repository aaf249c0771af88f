"""`westar demo`: the whole WeSTAR path on a corrupted synthetic target domain, offline.

1. Target domain (westar.synth + westar.corrupt): procedural room scenes rendered with
   exact metric depth and instance maps, corrupted (fog, noise, blur, ...).
   - ``data/<corruption>/train``: the unlabeled corrupted training images, their instance
     maps (stand-ins for SAM2 masks) and ``pairs.json``, ordinal weak labels made from the
     ground truth by `westar pairs` (5 structured samples per image, as in the paper; the
     depth maps are deleted afterwards, the trainer never sees them).
   - ``data/<corruption>/test``: held-out corrupted scenes with ground-truth depth.
     Scene seeds and corruption seeds of the two splits never overlap, and neither
     overlaps the scenes the source model was pretrained on (seeds < 10^7) or its own
     evaluation scenes (10^7 ...).
2. The shipped source model (westar/assets/source_model, a small Depth Anything V2
   pretrained on clean scenes) is evaluated on the test split.
3. It is adapted with WeSTAR (`westar.train`: LoRA student, EMA teacher, SA-HDN on
   instance contexts, ordinal loss, LoRA regularizer) on the training split.
4. The adapted model is evaluated again (the protocol of `westar eval`: per image least-
   squares scale and shift in disparity space, AbsRel and delta1, averaged over images).
5. A table is printed; ``metrics.json`` and ``demo.png`` (input | ground truth | source |
   adapted, disparity colour-mapped after alignment) are written to --output.

With ``--ablation`` the ladder of the paper's ablation is trained on the same data:
plain self-training (global median/MAD) -> grid HDN -> SA-HDN (instances) -> + weak labels
-> + regularization (= full WeSTAR).

Recipe (DEFAULTS; RESULTS.md says how it was chosen): LoRA rank 8 / alpha 16, EMA 0.996,
lambda_st 1.0, AdamW + cosine as in the paper; 400 steps of batch 4 at 126 x 126 with
lr 1e-2, lambda_w 1.0 and lambda_r 0.01 instead of the paper's 0.001 and 1.0, because
the demo domain and run are tiny (comment at DEFAULTS). `--lambda-w/--lambda-r` restore
the paper's weights.

    westar demo                                  # default job (<= 5 min on 2 CPU cores)
    westar demo --corruption all --ablation      # every corruption, the ablation ladder
    westar demo --quick                          # CI's shortened version (< 1 min)

Python: ``run_demo(output="runs/demo", corruption="fog")`` returns the metrics dict.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLI_HELP",
    "cli_arguments",
    "cli_run",
    "run_demo",
    "make_target_domain",
    "scene_seeds",
    "LADDER",
    "DEFAULTS",
    "QUICK",
]

CLI_HELP = "the default job: corrupted synthetic domain, source vs WeSTAR-adapted (table, picture)"

# Scene-seed bases of the demo's splits (the source model was pretrained on seeds from
# 1000 and evaluated on seeds from 10_000_000). `val` is for choosing a recipe, `test`
# is what the demo reports; never tune on `test`.
SPLIT_SEEDS = {"train": 20_000_000, "test": 30_000_000, "val": 40_000_000}
SEED_STRIDE = 100_000  # scenes per (split, seed) block

MAX_DEPTH = 50.0  # evaluation cap in meters; the rooms are at most ~25 m deep

# The demo's recipe, chosen on the validation split (scene seeds 40_000_000+, seed 100,
# fog severity 4; never on the test split): see RESULTS.md. Those tuning runs trained on
# seed 100's training block, which is seed 0's test block, so the default seed is 1 (its
# scenes, like those of seeds 2 and 3 that RESULTS.md reports, were never touched).
# Deviations from the paper, because the demo domain is tiny and the budget is a minute
# or two of CPU:
# - lr 1e-2 (paper 1e-4): 400 steps instead of thousands, a 2 M-parameter model;
# - lambda_w 1.0 (paper 0.001): the ordinal hinge acts on raw disparity, which this source
#   model outputs with a median near 1, and there are only 15 pairs per image; at 0.001
#   the term was ~1e-7 of the loss and changed nothing;
# - lambda_r 0.01 (paper 1.0): at 1.0 the regularizer held the adapters at ~0 for the
#   whole short run (validation: adapted == source to the 3rd decimal).
# LoRA rank 8 / alpha 16, EMA 0.996, lambda_st 1.0, AdamW + cosine are the paper's.
DEMO_LR = 1e-2

DEFAULTS: dict[str, Any] = dict(
    corruption="fog",
    severity=4,
    seed=1,  # not 0: see above
    train_images=64,
    eval_images=64,
    steps=400,
    image_size=126,
    batch_size=4,
    lr=DEMO_LR,
    lambda_w=1.0,
    lambda_r=0.01,
)
QUICK: dict[str, Any] = dict(train_images=8, eval_images=4, steps=3, image_size=56, batch_size=4)

# The ablation ladder: name -> (label, TrainConfig overrides).
LADDER: dict[str, tuple[str, dict[str, Any]]] = {
    "self_training": ("plain self-training", dict(hdn="global", lambda_w=0.0, lambda_r=0.0)),
    "grid_hdn": ("grid HDN", dict(hdn="grid", lambda_w=0.0, lambda_r=0.0)),
    "sa_hdn": ("SA-HDN", dict(hdn="instances", lambda_w=0.0, lambda_r=0.0)),
    "sa_hdn_weak": ("+ weak labels", dict(hdn="instances", lambda_r=0.0)),
    "full": ("+ regularization (WeSTAR)", dict(hdn="instances")),
}


def _corruptions() -> list[str]:
    from westar.corrupt import CORRUPTIONS

    return sorted(CORRUPTIONS)


def scene_seeds(split: str, seed: int, n: int) -> range:
    """Scene seeds of the first `n` scenes of `split` ("train", "test", "val") for demo
    seed `seed`: a block of SEED_STRIDE seeds per (split, seed). With seeds in [0, 100)
    the blocks of different splits and seeds never meet (tests/demo checks the seeds that
    RESULTS.md reports against the recipe-tuning runs)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; one of {tuple(SPLIT_SEEDS)}")
    if not 0 <= n <= SEED_STRIDE:
        raise ValueError(f"at most {SEED_STRIDE} scenes per split, got {n}")
    base = SPLIT_SEEDS[split] + seed * SEED_STRIDE
    return range(base, base + n)


def _mix(*parts: Any) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------ data


def make_target_domain(
    root: str | Path,
    corruption: str,
    severity: int,
    seed: int,
    train_images: int,
    eval_images: int,
    image_size: int,
    eval_split: str = "test",
    progress: bool = True,
) -> dict[str, Path]:
    """Write <root>/train (images, instances, pairs.json) and <root>/<eval_split> (images,
    depth) for one corruption. Returns {"train": path, "eval": path}."""
    from tqdm.auto import tqdm

    from westar.corrupt import corrupt_image
    from westar.pairs import make_pairs_file
    from westar.synth import SceneParams, render_scene, write_sample

    root = Path(root)
    params = SceneParams(height=image_size, width=image_size)
    out = {}
    for split, n in (("train", train_images), (eval_split, eval_images)):
        folder = root / split
        if folder.exists():
            shutil.rmtree(folder)
        seeds = scene_seeds(split, seed, n)
        for i, scene_seed in enumerate(
            tqdm(seeds, desc=f"{split} scenes ({corruption})", disable=not progress)
        ):
            scene = render_scene(scene_seed, params)
            image = corrupt_image(
                scene.image,
                corruption,
                severity,
                seed=_mix(split, seed, i),
                depth=scene.depth,
            )
            write_sample(
                folder,
                f"{split}_{scene_seed:08d}",
                image,
                depth=scene.depth,
                instances=scene.instances if split == "train" else None,
            )
        if split == "train":
            # The weak labels: ordinal pairs from depth (`westar pairs`), a stand-in for an
            # annotator's clicks. Then the depth goes: the training split is unlabeled.
            make_pairs_file(folder / "images", folder / "depth", folder / "pairs.json", seed=seed)
            shutil.rmtree(folder / "depth")
        out["train" if split == "train" else "eval"] = folder
    return out


# ------------------------------------------------------------------------------ eval


def _load_eval_split(folder: Path):
    from westar.synth import list_stems, read_sample

    stems = list_stems(folder)
    images, depths = [], []
    for stem in stems:
        image, depth, _ = read_sample(folder, stem)
        images.append(image)
        depths.append(depth)
    return stems, np.stack(images), np.stack(depths)


def _predict_all(net, depth_model, images: np.ndarray, device, batch: int = 16, desc: str = "",
                 progress: bool = True) -> np.ndarray:  # fmt: skip
    import torch
    from tqdm.auto import tqdm

    from westar.model import predict

    net.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
            x = torch.from_numpy(images[i : i + batch]).float().div(255).permute(0, 3, 1, 2)
            out.append(predict(net, depth_model, x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def _score(preds: np.ndarray, depths: np.ndarray) -> dict[str, Any]:
    from westar.evaluate import image_metrics

    per = [image_metrics(p, g, MAX_DEPTH) for p, g in zip(preds, depths)]
    ok = [m for m in per if m is not None]
    return {
        "abs_rel": float(np.mean([m["abs_rel"] for m in ok])),
        "delta1": float(np.mean([m["delta1"] for m in ok])),
        "images": len(ok),
        "_per_image": per,
    }


def _evaluate_models(model_dir, adapters: dict[str, Path], images, depths, device, progress):
    """{name: (metrics, predictions)} for the base model ("source") and each adapter."""
    import torch
    from peft import PeftModel

    from westar.model import load_depth_model

    dm = load_depth_model(str(model_dir), local_files_only=True)
    net = dm.model.to(device).eval()
    results = {}
    if "source" in adapters:
        raise ValueError("'source' is reserved for the base model")
    preds = _predict_all(net, dm, images, device, desc="eval source", progress=progress)
    results["source"] = (_score(preds, depths), preds)
    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(net, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.to(device).eval()
        preds = _predict_all(peft_model, dm, images, device, desc=f"eval {name}", progress=progress)
        results[name] = (_score(preds, depths), preds)
    del net, peft_model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


# ------------------------------------------------------------------------------ picture


def _picture(path: Path, images, depths, columns: dict[str, tuple[dict, np.ndarray]], rows=4):
    """PNG grid: one row per test image; input | ground truth | each model (aligned)."""
    from PIL import Image, ImageDraw

    from westar.evaluate import colorize

    n = min(rows, len(images))
    h, w = images.shape[1:3]
    head = 14
    titles = ["input", "ground truth"] + list(columns)
    canvas = Image.new("RGB", (w * len(titles), head + h * n), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((j * w + 3, 1), t[: max(4, w // 6)], fill=(0, 0, 0))
    for i in range(n):
        gt = depths[i]
        mask = np.isfinite(gt) & (gt > 1e-3) & (gt <= MAX_DEPTH)
        gt_disp = np.where(mask, 1.0 / np.where(mask, gt, 1.0), 0.0)
        lo, hi = np.percentile(gt_disp[mask], [2, 98])
        panels = [images[i], colorize(gt_disp, lo, hi, mask)]
        for metrics, preds in columns.values():
            m = metrics["_per_image"][i]
            aligned = m["scale"] * preds[i] + m["shift"] if m else np.zeros_like(gt_disp)
            panels.append(colorize(aligned, lo, hi))
        canvas.paste(Image.fromarray(np.concatenate(panels, axis=1)), (0, head + i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------ run


def _train_variant(model_dir, train_dir: Path, out_dir: Path, overrides: dict, args: dict,
                   device: str | None, progress: bool, desc: str) -> Path:  # fmt: skip
    from westar.config import TrainConfig
    from westar.train import Trainer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    values = dict(
        model=str(model_dir),
        data=str(train_dir),
        output_dir=str(out_dir),
        image_size=(args["image_size"], args["image_size"]),
        steps=args["steps"],
        batch_size=args["batch_size"],
        lr=args["lr"],
        seed=args["seed"],
        save_every=args["steps"],
        keep_checkpoints=1,
        tensorboard=False,
        progress=progress,
        cpu=device == "cpu",
        # the recipe above (lambda_w 1.0 in particular) was chosen with the ordinal term on
        # raw disparity; it stays there until a recipe is chosen for the normalized term
        ordinal_norm="raw",
    )
    # the loss weights of the variants that use the term (the ladder's zeros stay zero)
    values.update(lambda_w=args["lambda_w"], lambda_r=args["lambda_r"])
    values.update(overrides)
    cfg = TrainConfig(**values)
    if progress:
        print(f"training: {desc} ({cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g})")
    trainer = Trainer(cfg)
    last = trainer.fit()
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the demo needs no resume
    if not last or not math.isfinite(last.get("loss", float("nan"))):
        raise FloatingPointError(f"{desc}: training ended without a finite loss ({last})")
    return out_dir


def run_demo(
    output: str | Path = "runs/demo",
    corruption: str | list[str] = DEFAULTS["corruption"],
    severity: int = DEFAULTS["severity"],
    seed: int = DEFAULTS["seed"],
    train_images: int | None = None,
    eval_images: int | None = None,
    steps: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lambda_w: float | None = None,
    lambda_r: float | None = None,
    ablation: bool = False,
    variants: list[str] | None = None,
    quick: bool = False,
    device: str | None = None,
    model: str | Path | None = None,
    eval_split: str = "test",
    adapted_weights: str = "adapter",
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Build the corrupted target domain, evaluate the source model, adapt, evaluate.

    corruption: a name from westar.corrupt.CORRUPTIONS, "all", or a list of names.
    variants: names from LADDER to train (default: ["full"], or the whole ladder with
    ablation=True). adapted_weights: "adapter" (the student) or "teacher" (EMA).
    eval_split: "test" (what the demo reports) or "val" (for choosing a recipe).
    Returns the metrics dict (also written to <output>/metrics.json).
    """
    import torch

    t_start = time.perf_counter()
    args = dict(DEFAULTS)
    if quick:
        args.update(QUICK)
    for k, v in dict(
        severity=severity,
        seed=seed,
        train_images=train_images,
        eval_images=eval_images,
        steps=steps,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        lambda_w=lambda_w,
        lambda_r=lambda_r,
    ).items():
        if v is not None:
            args[k] = v
    if args["image_size"] % 14:
        raise ValueError(f"image_size must be a multiple of 14, got {args['image_size']}")
    if args["train_images"] < 1 or args["eval_images"] < 1 or args["steps"] < 1:
        raise ValueError("train_images, eval_images and steps must be >= 1")
    if not 0 <= args["seed"] < (SPLIT_SEEDS["test"] - SPLIT_SEEDS["train"]) // SEED_STRIDE:
        raise ValueError(
            f"seed must be in [0, 100) so that the splits' scenes stay apart, got {args['seed']}"
        )
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    if adapted_weights not in ("adapter", "teacher", "both"):
        raise ValueError(f"adapted_weights must be adapter|teacher|both, got {adapted_weights!r}")
    names = _corruptions()
    if isinstance(corruption, str):
        corruptions = names if corruption == "all" else [corruption]
    else:
        corruptions = list(corruption)
    for c in corruptions:
        if c not in names:
            raise ValueError(f"unknown corruption {c!r}; one of {names} or 'all'")
    if variants is None:
        variants = list(LADDER) if ablation else ["full"]
    for v in variants:
        if v not in LADDER:
            raise ValueError(f"unknown variant {v!r}; one of {tuple(LADDER)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        from westar.synth import source_model_path

        model = source_model_path()
    model = Path(model)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for c in corruptions:
        t0 = time.perf_counter()
        dirs = make_target_domain(
            output / "data" / c,
            c,
            args["severity"],
            args["seed"],
            args["train_images"],
            args["eval_images"],
            args["image_size"],
            eval_split=eval_split,
            progress=progress,
        )
        timing[f"{c}/data"] = time.perf_counter() - t0
        adapters = {}
        for v in variants:
            t0 = time.perf_counter()
            run_dir = _train_variant(
                model,
                dirs["train"],
                output / "runs" / c / v,
                LADDER[v][1],
                args,
                device,
                progress,
                f"{LADDER[v][0]} on {c}",
            )
            if adapted_weights == "both":  # for choosing a recipe: student and teacher
                adapters[v] = run_dir / "adapter"
                adapters[f"{v}@teacher"] = run_dir / "teacher"
            else:
                adapters[v] = run_dir / adapted_weights
            timing[f"{c}/train/{v}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stems, images, depths = _load_eval_split(dirs["eval"])
        evals = _evaluate_models(model, adapters, images, depths, device, progress)
        timing[f"{c}/eval"] = time.perf_counter() - t0
        main = "full" if "full" in variants else variants[-1]
        cols = {"source": evals["source"], "adapted": evals[main]}
        if len(corruptions) == 1:
            _picture(output / "demo.png", images, depths, cols)
        else:
            _picture(output / f"demo_{c}.png", images, depths, cols)
        results[c] = {
            name: {k: v for k, v in m.items() if not k.startswith("_")}
            for name, (m, _) in evals.items()
        }
        results[c]["per_image"] = {
            name: [
                None if p is None else {"abs_rel": p["abs_rel"], "delta1": p["delta1"]}
                for p in m["_per_image"]
            ]
            for name, (m, _) in evals.items()
        }
        results[c]["stems"] = stems

    report = {
        "settings": dict(
            args,
            corruptions=corruptions,
            variants=variants,
            eval_split=eval_split,
            adapted_weights=adapted_weights,
            quick=quick,
            device=device,
            model=str(model),
            max_depth=MAX_DEPTH,
            lambda_st=1.0,
            protocol="per image LS scale+shift in disparity space; AbsRel, delta1; mean",
        ),
        "variants": {v: LADDER[v][0] for v in variants},
        "results": results,
        "mean": _means(
            results,
            corruptions,
            [k for k in results[corruptions[0]] if k not in ("per_image", "stems")],
        ),
        "timing_seconds": {k: round(v, 2) for k, v in timing.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    (output / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if verbose:
        print()
        print(format_table(report))
        print(f"\nmetrics: {output / 'metrics.json'}")
        pics = ["demo.png"] if len(corruptions) == 1 else [f"demo_{c}.png" for c in corruptions]
        print(f"picture: {', '.join(str(output / p) for p in pics)}")
        print(f"wall time: {report['wall_seconds']:.0f} s")
    return report


def _means(results, corruptions, models) -> dict[str, dict[str, float]]:
    return {
        m: {
            k: float(np.mean([results[c][m][k] for c in corruptions]))
            for k in ("abs_rel", "delta1")
        }
        for m in models
    }


def format_table(report: dict[str, Any]) -> str:
    """The demo's table: source vs adapted, or the ablation ladder (paper's form)."""
    s = report["settings"]
    corruptions = s["corruptions"]
    variants = s["variants"]
    res = report["results"]
    lines = [
        f"held-out corrupted split ({s['eval_split']}, {s['eval_images']} images, severity "
        f"{s['severity']}, seed {s['seed']}): AbsRel (lower is better) / delta1 (higher)"
    ]
    rows = [("source", "Source (zero-shot)")] + [(v, LADDER[v][0]) for v in variants]
    if variants == ["full"]:
        rows = [("source", "source"), ("full", "adapted (WeSTAR)")]
    width = max(len(label) for _, label in rows) + 2
    multi = len(corruptions) > 1
    cols = corruptions + (["mean"] if multi else [])
    header = f"{'method':<{width}}" + "".join(f"{c[:17]:>19}" for c in cols)
    lines += [header, f"{'':<{width}}" + "".join(f"{'AbsRel  delta1':>19}" for _ in cols)]
    lines.append("-" * len(header))
    for key, label in rows:
        cells = []
        for c in cols:
            m = report["mean"][key] if c == "mean" else res[c][key]
            cells.append(f"{m['abs_rel']:>11.4f}{m['delta1']:>8.4f}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI


def cli_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--corruption",
        default=d["corruption"],
        help=f"one of {', '.join(_corruptions())}, or 'all' (default: {d['corruption']})",
    )
    p.add_argument("--severity", type=int, choices=range(1, 6), default=None,
                   help=f"corruption severity 1..5 (default: {d['severity']})")  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=None, help=f"data/training seed (default: {d['seed']})"
    )
    p.add_argument(
        "--train-images", type=int, help=f"unlabeled training images (default: {d['train_images']})"
    )
    p.add_argument(
        "--eval-images", type=int, help=f"held-out test images (default: {d['eval_images']})"
    )
    p.add_argument("--steps", type=int, help=f"training steps (default: {d['steps']})")
    p.add_argument(
        "--image-size", type=int, help=f"image side, multiple of 14 (default: {d['image_size']})"
    )
    p.add_argument("--batch-size", type=int, help=f"(default: {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"(default: {d['lr']:g})")
    p.add_argument(
        "--lambda-w", type=float, help=f"ordinal loss weight (default: {d['lambda_w']:g})"
    )
    p.add_argument(
        "--lambda-r", type=float, help=f"LoRA regularizer weight (default: {d['lambda_r']:g})"
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also train plain self-training, grid HDN, SA-HDN, + weak labels (the ladder)",
    )
    p.add_argument("--quick", action="store_true", help="CI's shortened version (< 1 minute)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--model", help="source model directory (default: the shipped one)")
    p.add_argument("--teacher", action="store_true", help="report the EMA teacher, not the student")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cli_run(args: argparse.Namespace) -> int:
    run_demo(
        output=args.output,
        corruption=args.corruption,
        severity=args.severity,
        seed=args.seed,
        train_images=args.train_images,
        eval_images=args.eval_images,
        steps=args.steps,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        lambda_w=args.lambda_w,
        lambda_r=args.lambda_r,
        ablation=args.ablation,
        quick=args.quick,
        device=args.device,
        model=args.model,
        adapted_weights="teacher" if args.teacher else "adapter",
        progress=not args.no_progress,
    )
    return 0
