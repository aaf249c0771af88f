#!/usr/bin/env python
"""Choose WeSTAR's recipe on the benchmark's validation split (never its test split).

    python scripts/recipe_search.py --data runs/bench/data --out runs/recipe_search

Every candidate of RECIPES is trained with `westar sweep`'s own run function on the
validation split of SEARCH_DOMAINS for SEARCH_SEEDS (the benchmark's training scenes for
training, its validation scenes for scoring), and both the student ("adapter") and the
EMA teacher are scored. One run file per (recipe, domain, seed), so the search resumes
where it stopped. The table (`OUT/RECIPES.md`, `OUT/recipes.json`) ranks the candidates by
the mean validation AbsRel over the search domains; the chosen recipe is then frozen in
`westar.sweep` / `westar.demo` by hand and only then run on the test split.

The candidate list was written before any of them ran; it is small on purpose (one
adaptation run costs minutes on two CPU cores): the paper's own loss weights, then λ_w
and lr around the scale-free term's natural unit (a normalized margin of 1 deviation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEARCH_DOMAINS = ("fog", "streets")  # one corruption and the natural shift, fixed beforehand
SEARCH_SEEDS = (0,)
STEPS = 300

# name -> (ladder method, recipe). lambda_st is 1 throughout.
RECIPES: dict[str, tuple[str, dict]] = {
    "paper": ("westar", dict(lr=1e-3, lambda_w=0.001, lambda_r=1.0)),  # the paper's weights
    "w0.1_lr1e-3": ("westar", dict(lr=1e-3, lambda_w=0.1, lambda_r=0.01)),
    "w0.1_lr3e-3": ("westar", dict(lr=3e-3, lambda_w=0.1, lambda_r=0.01)),
    "w1_lr3e-3": ("westar", dict(lr=3e-3, lambda_w=1.0, lambda_r=0.01)),
    "w0.1_lr3e-3_m0.25": ("westar", dict(lr=3e-3, lambda_w=0.1, lambda_r=0.01, margin=0.25)),
    "w0.1_lr1e-2": ("westar", dict(lr=1e-2, lambda_w=0.1, lambda_r=0.01)),
    "self_training_lr3e-3": ("self_training", dict(lr=3e-3)),
}


def _job(args: tuple) -> dict:
    """One (recipe, domain, seed): train + score student and teacher on val."""
    name, domain, seed, data, out, model, steps = args
    import torch

    torch.set_num_threads(1)
    from westar import sweep
    from westar.evaluate import evaluate

    method, recipe = RECIPES[name]
    recipe = dict(recipe, steps=steps, report="adapter")
    run_out = Path(out) / name
    sweep.run_sweep(data, run_out, methods=[method], domains=[domain], seeds=[seed],
                    split="val", recipe=recipe, model=model, verbose=False)  # fmt: skip
    run = sweep.Run(method, domain, seed)
    record = json.loads(sweep.run_file(run_out, run).read_text())
    teacher_file = run_out / "runs" / f"{run.name}.teacher.json"
    if not teacher_file.exists():
        rep = evaluate(model, Path(record["eval_dir"]) / "images", Path(record["eval_dir"]) / "depth",
                       adapters=[str(run_out / "work" / run.name / "teacher")], include_base=False,
                       max_depth=record["max_depth"], device="cpu")  # fmt: skip
        res = next(iter(rep["results"].values()))
        teacher_file.write_text(json.dumps({"abs_rel": res["abs_rel"], "delta1": res["delta1"]}))
    teacher = json.loads(teacher_file.read_text())
    source = json.loads(sweep.run_file(run_out, sweep.Run("source", domain, seed)).read_text()) \
        if sweep.run_file(run_out, sweep.Run("source", domain, seed)).exists() else None  # fmt: skip
    return dict(recipe=name, domain=domain, seed=seed, student=[record["abs_rel"], record["delta1"]],
                teacher=[teacher["abs_rel"], teacher["delta1"]],
                train_seconds=record.get("train", {}).get("seconds"),
                source=[source["abs_rel"], source["delta1"]] if source else None)  # fmt: skip


def _source(args: tuple) -> dict:
    domain, seed, data, out, model = args
    import torch

    torch.set_num_threads(1)
    from westar import sweep

    run_out = Path(out) / "source"
    sweep.run_sweep(data, run_out, methods=["source"], domains=[domain], seeds=[seed],
                    split="val", model=model, verbose=False)  # fmt: skip
    rec = json.loads(sweep.run_file(run_out, sweep.Run("source", domain, seed)).read_text())
    return dict(domain=domain, seed=seed, source=[rec["abs_rel"], rec["delta1"]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="runs/bench/data")
    ap.add_argument("--out", default="runs/recipe_search")
    ap.add_argument("--model", default=None, help="source model (default: the shipped one)")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, 1 thread each")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--steps", type=int, default=STEPS, help="(fewer only to try the script)")
    a = ap.parse_args(argv)
    from westar.synth import source_model_path

    model = str(a.model or source_model_path())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, d, s, a.data, str(out), model, a.steps) for n in a.recipes for d in SEARCH_DOMAINS
            for s in SEARCH_SEEDS]  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(a.workers) as pool:
        sources = list(pool.map(_source, [(d, s, a.data, str(out), model) for d in SEARCH_DOMAINS
                                          for s in SEARCH_SEEDS]))  # fmt: skip
        rows = []
        for row in pool.map(_job, jobs):
            rows.append(row)
            print(f"{row['recipe']:<24}{row['domain']:<10} student {row['student'][0]:.4f} "
                  f"{row['student'][1]:.4f}  teacher {row['teacher'][0]:.4f} "
                  f"{row['teacher'][1]:.4f}", flush=True)  # fmt: skip
    src = {(r["domain"], r["seed"]): r["source"] for r in sources}
    lines = [
        "# Recipe search (validation split only)",
        "",
        f"Command: `python scripts/recipe_search.py --data {a.data} --out {a.out}`; "
        f"domains {', '.join(SEARCH_DOMAINS)}, seeds {SEARCH_SEEDS}, {a.steps} steps, batch 4, "
        "validation split (32 scenes per domain). AbsRel / δ1 per domain; mean over domains.",
        "",
        "| recipe | method | settings | "
        + " | ".join(f"{d} student | {d} teacher" for d in SEARCH_DOMAINS)
        + " | mean AbsRel student | mean AbsRel teacher |",
        "|---" * (5 + 2 * len(SEARCH_DOMAINS)) + "|",
        "| source | - | - | "
        + " | ".join(f"{src[(d, 0)][0]:.4f} / {src[(d, 0)][1]:.4f} | -" for d in SEARCH_DOMAINS)
        + f" | {sum(src[(d, 0)][0] for d in SEARCH_DOMAINS) / len(SEARCH_DOMAINS):.4f} | - |",
    ]
    summary = {}
    for name in a.recipes:
        mine = {r["domain"]: r for r in rows if r["recipe"] == name}
        ms = sum(mine[d]["student"][0] for d in SEARCH_DOMAINS) / len(SEARCH_DOMAINS)
        mt = sum(mine[d]["teacher"][0] for d in SEARCH_DOMAINS) / len(SEARCH_DOMAINS)
        summary[name] = dict(mean_student=ms, mean_teacher=mt, runs=list(mine.values()))
        method, recipe = RECIPES[name]
        cells = " | ".join(
            f"{mine[d]['student'][0]:.4f} / {mine[d]['student'][1]:.4f} | "
            f"{mine[d]['teacher'][0]:.4f} / {mine[d]['teacher'][1]:.4f}"
            for d in SEARCH_DOMAINS
        )
        lines.append(f"| {name} | {method} | {recipe} | {cells} | {ms:.4f} | {mt:.4f} |")
    (out / "RECIPES.md").write_text("\n".join(lines) + "\n")
    (out / "recipes.json").write_text(json.dumps(dict(source=sources, recipes=summary), indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
