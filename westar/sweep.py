"""`westar sweep`: the ablation ladder on the frozen benchmark, one result file per run.

A run is (method, domain, seed). Methods: "source" (the unadapted model), the rungs of
`westar.config.LADDER` (self_training, grid_hdn, sa_hdn, sa_hdn_weak, westar) and
"oracle" (the source fine-tuned with the same LoRA budget on the target's training split
with its full ground-truth depth: `pseudo_label="depth"`, global context, no weak labels,
no regularizer; an upper bound, the reference of the natural shift's gap recovery).

The benchmark (`westar.bench`, imported on first use) gives the domains, seeds, depth
caps and the folder of each split: ``split_dir(root, domain, seed, split)`` =
``<root>/<domain>/seed<k>/<split>/`` with train (images/, instances/, pairs.json,
depth/), val and test (images/, depth/).

Each adapted run trains `westar.train.Trainer` on the domain's train split, with the
recipe (TrainConfig fields, ``--recipe``) under the rung's overrides (a rung's zeros win),
seeded with the benchmark seed, then evaluates the chosen adapter (the recipe's
``"report"``: "adapter" = the student, or "teacher" = the EMA teacher) on ``--split``
(val for choosing a recipe, test for the results) with `westar.evaluate`. "source" runs
evaluate the unadapted model; on the clean domain only "source" runs (the reference of
the corruptions).

Resumable: each finished run writes ``<out>/runs/<method>__<domain>__seed<k>.json``
atomically, and a run whose file exists is skipped. A run interrupted mid-training
resumes from its trainer checkpoint in ``<out>/work/<run>/`` (or restarts cleanly when it
had none). ``--report`` reads the run files and writes ``sweep.json``, ``SWEEP.md`` and
``ladder.png`` (docs/sweep.md).

    westar sweep --data bench/ --out runs/sweep --split test --recipe recipe.json
    westar sweep --data bench/ --out runs/sweep --methods source westar --domains fog
    westar sweep --out runs/sweep --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from westar.config import LADDER

__all__ = [
    "CLI_HELP",
    "cli_arguments",
    "cli_run",
    "METHODS",
    "ORACLE",
    "DEFAULT_RECIPE",
    "Run",
    "plan",
    "run_one",
    "run_sweep",
    "load_runs",
    "aggregate",
    "write_report",
]

CLI_HELP = "the ablation ladder on the frozen benchmark: resumable runs, report, figure"

ORACLE: dict[str, Any] = {
    "pseudo_label": "depth",
    "lambda_st": 1.0,  # its only term: a recipe's lambda_st (possibly 0) must not remove it
    "hdn": "global",
    "lambda_w": 0.0,
    "lambda_r": 0.0,
}
# weak_only: the weak labels alone (lambda_st = 0, lambda_r = 0): against "sa_hdn_weak"
# (the same plus self-training) it tells what self-training adds
METHODS: tuple[str, ...] = ("source", *LADDER, "weak_only", "oracle")
CLEAN = "clean"  # the reference domain of the corruptions (only "source" runs there)
NATURAL = ("streets",)  # natural shifts: reference = the oracle
KEYS = ("abs_rel", "delta1")

# The recipe when --recipe is not given, chosen on the benchmark's validation split
# (scripts/recipe_search.py, RESULTS.md section 3: a lambda_st x lambda_w grid, then
# finalists on a second seed, a faster EMA teacher and fewer steps; the best mean of
# AbsRel / source AbsRel over fog, low light and streets on two seeds). Keys are
# TrainConfig fields, plus "report" (which adapter is evaluated: "adapter" or "teacher")
# and "eval_size" (inference side; None = the model's own). Self-training is off
# (lambda_st 0): with the slow EMA teacher it held the student near the source. The
# ordinal term is the scale-free one (TrainConfig's ordinal_norm="global"), margin 0,
# LoRA rank 8 / alpha 16; 20 % of the pairs are held out and their accuracy logged.
DEFAULT_RECIPE: dict[str, Any] = {
    "steps": 150,
    "batch_size": 4,
    "lr": 3e-3,
    "lambda_st": 0.0,
    "lambda_w": 10.0,
    "lambda_r": 0.01,
    "ema_decay": 0.996,
    "holdout_pairs": 0.2,
    "holdout_every": 50,
    "report": "adapter",
}
SWEEP_KEYS = ("report", "eval_size")
# fixed by the sweep for every run, not by a recipe
RUN_FIELDS = ("model", "data", "output_dir", "seed", "resume", "progress", "cpu", "ablation")


def _bench():
    """westar.bench, the frozen benchmark: DOMAINS, SEEDS, MAX_DEPTH, split_dir."""
    import importlib

    return importlib.import_module("westar.bench")


@dataclass(frozen=True)
class Run:
    method: str
    domain: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}__{self.domain}__seed{self.seed}"


def plan(methods, domains, seeds) -> list[Run]:
    """The runs of a sweep, seed by seed: every method on every target domain; on the
    clean domain only "source", added for each seed when a corruption is swept."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; one of {METHODS}")
    runs = []
    corruptions = [d for d in domains if d != CLEAN and d not in NATURAL]
    for seed in seeds:
        if corruptions or CLEAN in domains:
            runs.append(Run("source", CLEAN, seed))
        for domain in domains:
            if domain == CLEAN:
                continue
            runs += [Run(m, domain, seed) for m in methods]
    return list(dict.fromkeys(runs))


def _recipe(recipe: dict | None) -> dict[str, Any]:
    """DEFAULT_RECIPE updated with `recipe`, checked against TrainConfig."""
    from westar.config import TrainConfig

    values = dict(DEFAULT_RECIPE, **(recipe or {}))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown} (TrainConfig fields, report, eval_size)")
    fixed = sorted(set(values) & set(RUN_FIELDS))
    if fixed:
        raise ValueError(f"recipe keys {fixed} are set by the sweep for each run")
    if values["report"] not in ("adapter", "teacher"):
        raise ValueError(
            f"recipe 'report' must be 'adapter' or 'teacher', got {values['report']!r}"
        )
    TrainConfig(**{k: v for k, v in values.items() if k not in SWEEP_KEYS})  # validates
    return values


def train_config(method: str, recipe: dict, model, train_dir, output_dir, seed: int, device):
    """The TrainConfig of an adapted run: recipe, then the method's overrides."""
    from westar.config import ABLATIONS, TrainConfig

    values = {k: v for k, v in recipe.items() if k not in SWEEP_KEYS}
    if method == "oracle":
        values.update(ORACLE)
    else:
        values.update(ABLATIONS[method], ablation=method)
    values.update(
        model=str(model),
        data=str(train_dir),
        output_dir=str(output_dir),
        seed=int(seed),
        progress=False,
        cpu=device == "cpu",
    )
    values.setdefault("tensorboard", False)
    return TrainConfig(**values)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _metrics(work: Path) -> dict[str, Any]:
    """From a run's metrics.csv: the final loss and the held-out pair accuracy at the
    start (step 0, the source) and at the end (None where not measured)."""
    import csv

    def number(row: dict, key: str) -> float | None:
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return None

    try:
        with open(work / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    held = [(int(r["step"]), number(r, "heldout_acc")) for r in rows]
    held = [(step, acc) for step, acc in held if acc is not None]
    return {
        "final_loss": number(rows[-1], "loss") if rows else None,
        "heldout_acc_start": held[0][1] if held and held[0][0] == 0 else None,
        "heldout_acc": held[-1][1] if held else None,
        "heldout_curve": held,
    }


def run_file(out: str | Path, run: Run) -> Path:
    return Path(out) / "runs" / f"{run.name}.json"


def run_one(
    run: Run,
    *,
    data: str | Path,
    out: str | Path,
    model: str | Path,
    recipe: dict,
    split: str = "val",
    device: str | None = None,
    bench=None,
    verbose: bool = True,
) -> dict[str, Any] | None:
    """Train (unless "source") and evaluate one run; write its file. None when the file
    already exists (the run is skipped)."""
    import torch

    from westar.evaluate import evaluate
    from westar.model import adapter_delta_sq_norm

    bench = bench or _bench()
    path = run_file(out, run)
    if path.exists():
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    eval_dir = Path(bench.split_dir(data, run.domain, run.seed, split))
    record: dict[str, Any] = {
        "method": run.method,
        "domain": run.domain,
        "seed": run.seed,
        "split": split,
        "model": str(model),
        "eval_dir": str(eval_dir),
        "max_depth": float(bench.MAX_DEPTH[run.domain]),
    }
    adapter = None
    if run.method != "source":
        from westar.checkpoint import find_latest_checkpoint
        from westar.train import Trainer

        work = Path(out) / "work" / run.name
        train_dir = Path(bench.split_dir(data, run.domain, run.seed, "train"))
        cfg = train_config(run.method, recipe, model, train_dir, work, run.seed, device)
        resumed = find_latest_checkpoint(work) is not None
        if resumed:  # interrupted mid-training: continue from its last checkpoint
            cfg = dataclasses.replace(cfg, resume="auto")
        elif work.exists():  # interrupted before its first checkpoint: start again
            shutil.rmtree(work)
        if verbose:
            how = "resuming" if resumed else "training"
            print(f"{run.name}: {how} ({cfg.steps} steps, lr {cfg.lr:g})", flush=True)
        t_train = time.perf_counter()
        Trainer(cfg).fit()
        adapter = work / recipe["report"]
        record["config"] = cfg.to_dict()
        record["train"] = {
            "seconds": round(time.perf_counter() - t_train, 2),
            "resumed": resumed,
            **_metrics(work),
            "adapter_change": adapter_delta_sq_norm(work / "adapter"),
        }
    report = evaluate(
        str(model),
        eval_dir / "images",
        eval_dir / "depth",
        adapters=[str(adapter)] if adapter else [],
        include_base=adapter is None,
        max_depth=record["max_depth"],
        size=recipe.get("eval_size"),
        device=device,
    )
    result = next(iter(report["results"].values()))
    record.update(
        abs_rel=result["abs_rel"],
        delta1=result["delta1"],
        images=result["images"],
        per_image={s: {k: m[k] for k in KEYS} for s, m in result["per_image"].items()},
        recipe=recipe,
        reported=recipe["report"] if adapter else "base",
        eval_size=report["size"],
        wall_seconds=round(time.perf_counter() - t0, 2),
        torch_threads=torch.get_num_threads(),
        device=str(device),
        git_commit=_git_commit(),
        host=platform.node(),
        torch_version=torch.__version__,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    _write_json_atomic(path, record)
    if adapter is not None:  # the adapters stay (small); the optimizer states go
        shutil.rmtree(Path(out) / "work" / run.name / "checkpoints", ignore_errors=True)
    if verbose:
        print(f"{run.name}: AbsRel {record['abs_rel']:.4f} delta1 {record['delta1']:.4f} "
              f"({record['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
    return record


def _check_existing(out: Path, runs: list[Run], split: str, recipe: dict) -> None:
    """Refuse to mix run files of another split or recipe into this output folder."""
    for run in runs:
        path = run_file(out, run)
        if not path.exists():
            continue
        old = json.loads(path.read_text())
        if old.get("split") != split:
            raise ValueError(
                f"{path}: a --split {old.get('split')} run; this sweep is --split {split} "
                "(use another --out)"
            )
        if run.method != "source" and old.get("recipe") != recipe:
            raise ValueError(f"{path}: trained with another recipe (use another --out)")


def run_sweep(
    data: str | Path,
    out: str | Path,
    *,
    methods=METHODS,
    domains=None,
    seeds=None,
    split: str = "val",
    recipe: dict | None = None,
    model: str | Path | None = None,
    device: str | None = None,
    max_runs: int | None = None,
    bench=None,
    verbose: bool = True,
    workers: int = 1,
) -> dict[str, int]:
    """Every planned run whose file is missing, in order; {"done", "skipped", "left"}.
    With workers > 1 (--parallel-runs), that many processes run them in parallel
    (cores / workers torch threads each; the benchmark module is imported in each),
    method by method in the order of `methods`."""
    bench = bench or _bench()
    if workers < 1:
        raise ValueError(f"--parallel-runs must be >= 1, got {workers}")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    domains = list(domains or bench.DOMAINS)
    seeds = list(bench.SEEDS if seeds is None else seeds)
    for d in domains:
        if d not in bench.DOMAINS:
            raise ValueError(f"unknown domain {d!r}; one of {tuple(bench.DOMAINS)}")
    if model is None:
        from westar.synth import source_model_path

        model = source_model_path()
    recipe = _recipe(recipe)
    out = Path(out)
    runs = plan(methods, domains, seeds)
    _check_existing(out, runs, split, recipe)
    _record_plan(out, methods, domains, seeds, split, recipe, data, model)
    todo = [run for run in runs if not run_file(out, run).exists()]
    counts = {"done": 0, "skipped": len(runs) - len(todo), "left": 0}
    if max_runs is not None:
        todo, counts["left"] = todo[:max_runs], max(0, len(todo) - max_runs)
    kw = dict(data=data, out=out, model=model, recipe=recipe, split=split, device=device,
              verbose=verbose)  # fmt: skip
    if workers <= 1:
        for run in todo:
            run_one(run, bench=bench, **kw)
            counts["done"] += 1
        return counts
    import types
    from concurrent.futures import ProcessPoolExecutor

    kw["bench"] = None if isinstance(bench, types.ModuleType) else bench  # modules don't pickle
    # method by method, in the order of `methods`: a sweep cut short lacks the last methods'
    # runs, not a seed of every method
    order = {m: i for i, m in enumerate(methods)}
    todo.sort(key=lambda run: order.get(run.method, -1))  # the clean source runs first
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, initializer=_set_threads, initargs=(threads,)) as pool:
        for _ in pool.map(_run_job, [(run, kw) for run in todo]):
            counts["done"] += 1
    return counts


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _run_job(job: tuple) -> None:
    run, kw = job
    run_one(run, **kw)


def _union(*lists) -> list:
    return list(dict.fromkeys(x for values in lists for x in values))


def _record_plan(out: Path, methods, domains, seeds, split, recipe, data, model) -> None:
    """<out>/plan.json: the union of what every invocation planned (for `missing`)."""
    path = out / "plan.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    meta = {
        "methods": _union(old.get("methods", []), methods),
        "domains": _union(old.get("domains", []), domains),
        "seeds": sorted(_union(old.get("seeds", []), seeds)),
        "split": split,
        "recipe": recipe,
        "data": str(data),
        "model": str(model),
    }
    _write_json_atomic(path, meta)


# ------------------------------------------------------------------------------ report


def load_runs(out: str | Path) -> dict[tuple[str, str, int], dict]:
    """{(method, domain, seed): record} of every run file under <out>/runs."""
    runs = {}
    for path in sorted((Path(out) / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        runs[(r["method"], r["domain"], int(r["seed"]))] = r
    return runs


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def _reference(domain: str) -> tuple[str, str]:
    """(method, domain) of the gap-recovery reference of a target domain."""
    return ("oracle", domain) if domain in NATURAL else ("source", CLEAN)


def _source_heldout(runs: dict, domain: str, seed: int) -> float | None:
    """The source model's held-out pair accuracy on (domain, seed): logged at step 0 by
    the trained runs (the same held-out pairs for every method of a seed)."""
    for (_, d, s), r in runs.items():
        acc = (r.get("train") or {}).get("heldout_acc_start")
        if d == domain and s == seed and acc is not None:
            return acc
    return None


def aggregate(runs: dict, methods=None, domains=None, seeds=None) -> dict[str, Any]:
    """Per target domain: mean ± std over seeds of AbsRel and delta1 of each method,
    paired-by-seed differences vs source and vs self_training (mean over the seeds both
    have, and wins = seeds where the method is better in both metrics), and gap recovery
    (S - A) / (S - R) from the seed means of the seeds where source S, method A and the
    reference R all ran (R: the source on the clean domain, same seed and split, for a
    corruption; the oracle for a natural shift); averaged over the domains where it is
    defined. Also the planned runs that are missing."""
    methods = list(methods or dict.fromkeys(m for m in METHODS if any(k[0] == m for k in runs)))
    domains = list(domains or dict.fromkeys(k[1] for k in sorted(runs, key=lambda k: k[1])))
    seeds = sorted(seeds if seeds is not None else {k[2] for k in runs})
    splits = sorted({r["split"] for r in runs.values()})
    per_domain: dict[str, Any] = {}
    for domain in domains:
        if domain == CLEAN:
            continue
        ref_method, ref_domain = _reference(domain)
        rows = {}
        for m in methods:
            got = {s: runs[(m, domain, s)] for s in seeds if (m, domain, s) in runs}
            if not got:
                continue
            row: dict[str, Any] = {
                k: dict(
                    _stats([r[k] for r in got.values()]), per_seed={s: r[k] for s, r in got.items()}
                )
                for k in KEYS
            }
            held = [(r.get("train") or {}).get("heldout_acc") for r in got.values()]
            if m == "source":  # the step-0 accuracy of any trained run (the source model)
                held = [_source_heldout(runs, domain, s) for s in got]
            if held and all(h is not None for h in held):  # westar train --holdout-pairs
                row["heldout_acc"] = _stats(held)
            for base in ("source", "self_training"):
                if m in (base, "source"):
                    continue
                both = [s for s in got if (base, domain, s) in runs]
                if not both:
                    continue
                diff = {
                    k: float(np.mean([got[s][k] - runs[(base, domain, s)][k] for s in both]))
                    for k in KEYS
                }
                wins = sum(
                    got[s]["abs_rel"] < runs[(base, domain, s)]["abs_rel"]
                    and got[s]["delta1"] > runs[(base, domain, s)]["delta1"]
                    for s in both
                )
                row[f"vs_{base}"] = {"abs_rel": diff["abs_rel"], "delta1": diff["delta1"],
                                     "wins": int(wins), "seeds": len(both)}  # fmt: skip
            trio = [
                s
                for s in got
                if ("source", domain, s) in runs and (ref_method, ref_domain, s) in runs
            ]
            if trio and m != "source":
                src = float(np.mean([runs[("source", domain, s)]["abs_rel"] for s in trio]))
                ada = float(np.mean([got[s]["abs_rel"] for s in trio]))
                ref = float(np.mean([runs[(ref_method, ref_domain, s)]["abs_rel"] for s in trio]))
                gap = src - ref
                row["gap_recovery"] = {
                    "value": (src - ada) / gap if gap > 0 else None,
                    "source": src, "adapted": ada, "reference": ref, "seeds": len(trio),
                    "note": None if gap > 0 else "no gap: the reference is not better than the source",
                }  # fmt: skip
            rows[m] = row
        per_domain[domain] = {"reference": f"{ref_method} on {ref_domain}", "methods": rows}
    average = {}
    for m in methods:
        vals = [
            d["methods"][m]["gap_recovery"]["value"]
            for d in per_domain.values()
            if m in d["methods"]
            and (d["methods"][m].get("gap_recovery") or {}).get("value") is not None
        ]
        if vals:
            average[m] = {"gap_recovery": float(np.mean(vals)), "domains": len(vals)}
    missing = [
        r.name for r in plan(methods, domains, seeds) if (r.method, r.domain, r.seed) not in runs
    ]
    return {
        "methods": methods,
        "domains": domains,
        "seeds": seeds,
        "splits": splits,
        "per_domain": per_domain,
        "average": average,
        "missing": missing,
        "runs": len(runs),
        "protocol": "per image LS scale+shift in disparity; AbsRel, delta1 averaged over "
        "images; mean ± std (population) over seeds; differences paired by seed",
    }


def _label(m: str) -> str:
    labels = {"source": "source", "oracle": "oracle (GT depth)", "weak_only": "weak labels only"}
    return labels.get(m) or f"{m} ({LADDER[m][0]})"


def _fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_markdown(sweep: dict) -> str:
    lines = [
        "# Sweep: the ablation ladder on the benchmark",
        "",
        f"Split: {', '.join(sweep['splits']) or '–'}; seeds {sweep['seeds']}; "
        f"{sweep['runs']} run files. {sweep['protocol']}.",
        "Gap recovery = (AbsRel source - AbsRel method) / (AbsRel source - AbsRel reference), "
        "from seed means; reference = the source on `clean` (corruptions) or the oracle "
        "(natural shift).",
        "",
    ]
    for domain, d in sweep["per_domain"].items():
        lines += [
            f"## {domain} (reference: {d['reference']})",
            "",
            "| method | seeds | AbsRel | δ1 | ΔAbsRel vs source | Δδ1 vs source | wins vs "
            "source | ΔAbsRel vs self-training | Δδ1 vs self-training | wins vs self-training "
            "| gap recovery | held-out pair acc |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, row in d["methods"].items():
            cells = [_label(m), str(row["abs_rel"]["n"])]
            cells += [f"{_fmt(row[k]['mean'])} ± {_fmt(row[k]['std'])}" for k in KEYS]
            for base in ("source", "self_training"):
                v = row.get(f"vs_{base}")
                cells += [
                    _fmt(v and v["abs_rel"], sign=True),
                    _fmt(v and v["delta1"], sign=True),
                    f"{v['wins']}/{v['seeds']}" if v else "–",
                ]
            g = row.get("gap_recovery")
            cells.append(f"{100 * g['value']:.1f} %" if g and g["value"] is not None else "–")
            h = row.get("heldout_acc")
            cells.append(f"{h['mean']:.3f} ± {h['std']:.3f}" if h else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if sweep["average"]:
        lines += ["## Gap recovery, averaged over domains", "", "| method | gap recovery | domains |",
                  "|---|---|---|"]  # fmt: skip
        for m, a in sweep["average"].items():
            lines.append(f"| {_label(m)} | {100 * a['gap_recovery']:.1f} % | {a['domains']} |")
        lines.append("")
    lines += ["## Missing runs", ""]
    lines += [f"- `{name}`" for name in sweep["missing"]] or ["none"]
    return "\n".join(lines) + "\n"


_COLORS = [(120, 120, 120), (66, 133, 244), (52, 168, 83), (251, 188, 5), (234, 67, 53),
           (142, 36, 170), (0, 0, 0), (0, 172, 193)]  # fmt: skip


def ladder_figure(sweep: dict, path: str | Path) -> Path | None:
    """Grouped bars per domain (one bar per method; error bars = std over seeds), AbsRel
    on top and delta1 below, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    domains = list(sweep["per_domain"])
    methods = [
        m for m in sweep["methods"] if any(m in d["methods"] for d in sweep["per_domain"].values())
    ]
    if not domains or not methods:
        return None
    bar, gap, left, panel_h, top = 16, 24, 60, 220, 24
    group = bar * len(methods) + gap
    width = max(left + group * len(domains) + 20, 320)
    legend_h = 16 * len(methods) + 8
    height = top + 2 * (panel_h + 40) + legend_h
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    for p, key in enumerate(KEYS):
        y0 = top + p * (panel_h + 40)
        vals = [
            (row[key]["mean"] + row[key]["std"])
            for d in sweep["per_domain"].values()
            for row in d["methods"].values()
        ]
        vmax = max(vals + [1e-6]) * 1.1
        draw.text((4, y0 - 16), "AbsRel (lower is better)" if key == "abs_rel" else "delta1 (higher is better)", fill="black")  # fmt: skip
        draw.line((left, y0, left, y0 + panel_h), fill="black")
        draw.line((left, y0 + panel_h, width - 10, y0 + panel_h), fill="black")
        for t in range(5):
            v = vmax * t / 4
            y = y0 + panel_h - panel_h * t / 4
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((4, y - 6), f"{v:.3f}", fill="black")
        for i, domain in enumerate(domains):
            x0 = left + 10 + i * group
            for j, m in enumerate(methods):
                row = sweep["per_domain"][domain]["methods"].get(m)
                if row is None:
                    continue
                mu, sd = row[key]["mean"], row[key]["std"]
                x = x0 + j * bar
                h = panel_h * mu / vmax
                draw.rectangle(
                    (x, y0 + panel_h - h, x + bar - 2, y0 + panel_h), fill=_COLORS[j % len(_COLORS)]
                )
                xc = x + (bar - 2) / 2
                lo, hi = (y0 + panel_h - panel_h * (mu + s) / vmax for s in (-sd, sd))
                draw.line((xc, lo, xc, hi), fill="black")
                draw.line((xc - 3, hi, xc + 3, hi), fill="black")
                draw.line((xc - 3, lo, xc + 3, lo), fill="black")
            draw.text((x0, y0 + panel_h + 4), domain[: max(3, group // 6)], fill="black")
    ly = top + 2 * (panel_h + 40)
    for j, m in enumerate(methods):
        x, y = left, ly + 16 * j
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=_COLORS[j % len(_COLORS)])
        draw.text((x + 14, y), _label(m), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write_report(out: str | Path, methods=None, domains=None, seeds=None) -> dict[str, Any]:
    """sweep.json, SWEEP.md and ladder.png in `out` from its run files."""
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"{out / 'runs'}: no run files")
    planned = out / "plan.json"
    meta = json.loads(planned.read_text()) if planned.is_file() else {}
    if methods is None:  # what was planned, and whatever else ran
        found = {k[0] for k in runs}
        methods = [m for m in METHODS if m in set(meta.get("methods", [])) | found]
    if domains is None:
        domains = _union(meta.get("domains", []), sorted({k[1] for k in runs}))
    if seeds is None:
        seeds = sorted(_union(meta.get("seeds", []), {k[2] for k in runs}))
    sweep = aggregate(runs, methods, domains, seeds)
    _write_json_atomic(out / "sweep.json", sweep)
    (out / "SWEEP.md").write_text(format_markdown(sweep))
    ladder_figure(sweep, out / "ladder.png")
    return sweep


# ------------------------------------------------------------------------------ CLI


def cli_arguments(p: argparse.ArgumentParser) -> None:
    from westar.cli_flags import DEVICE_HELP, MODEL_HELP, deprecated_alias, model_name

    p.add_argument("--data", help="the benchmark's root folder, westar.bench's layout "
                   "(required unless --report)")  # fmt: skip
    p.add_argument("--out", required=True, help="sweep folder: runs/, work/, report")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   metavar="METHOD", help=f"methods to run (default: all: {' '.join(METHODS)})")  # fmt: skip
    p.add_argument("--domains", nargs="+",
                   help="benchmark domains to run (default: every domain of westar.bench)")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int,
                   help="benchmark seeds to run (default: westar.bench.SEEDS)")  # fmt: skip
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="evaluated split: val to choose a recipe, test for results (default: val)")  # fmt: skip
    p.add_argument("--recipe", help="JSON object or file: TrainConfig fields + report "
                   "(adapter|teacher) + eval_size (default: the demo's recipe)")  # fmt: skip
    p.add_argument("--model", type=model_name, help=MODEL_HELP + " (default: source)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--max-runs", type=int,
                   help="stop after this many new runs, resume later (default: no limit)")  # fmt: skip
    p.add_argument("--parallel-runs", type=int, default=1, dest="workers",
                   help="runs in parallel, each with cores / N torch threads (default: 1)")  # fmt: skip
    deprecated_alias(p, "--workers", "--parallel-runs", "workers", type=int)
    p.add_argument("--report", action="store_true",
                   help="only write sweep.json, SWEEP.md and ladder.png from the run files")  # fmt: skip


def _read_recipe(text: str | None) -> dict | None:
    if not text:
        return None
    from westar.data import loads_strict, read_json_file

    if text.lstrip().startswith("{"):
        try:
            recipe = loads_strict(text)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"--recipe is not a JSON object ({err})") from err
    else:
        recipe = read_json_file(text, "--recipe")
    if not isinstance(recipe, dict):
        raise ValueError("--recipe must be a JSON object")
    return recipe


def cli_run(args: argparse.Namespace) -> int:
    if not args.report:
        if not args.data:
            raise ValueError("give --data (the benchmark root), or --report")
        counts = run_sweep(
            args.data, args.out, methods=args.methods, domains=args.domains, seeds=args.seeds,
            split=args.split, recipe=_read_recipe(args.recipe), model=args.model,
            device=args.device, max_runs=args.max_runs, workers=args.workers,
        )  # fmt: skip
        print(f"runs: {counts['done']} done, {counts['skipped']} already there, "
              f"{counts['left']} left")  # fmt: skip
    sweep = write_report(args.out)
    print(f"report: {Path(args.out) / 'SWEEP.md'} ({sweep['runs']} runs, "
          f"{len(sweep['missing'])} missing)")  # fmt: skip
    return 0
