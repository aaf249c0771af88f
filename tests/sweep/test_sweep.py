"""`westar sweep` on a tiny fake benchmark tree (the layout of westar.bench, written here
with westar.synth) and the tiny random-init model: a run writes its file, a second
invocation skips it, an interrupted run resumes from its checkpoint, the oracle trains on
ground-truth depth, and the report's arithmetic (gap recovery, paired differences) is
checked on hand-made run files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

SIZE = 56
DOMAINS = ("clean", "fog", "streets")
MAX_DEPTH = {"clean": 50.0, "fog": 50.0, "streets": 80.0}
RECIPE = {"steps": 2, "batch_size": 2, "lr": 1e-3, "image_size": [SIZE, SIZE],
          "save_every": 1, "eval_size": SIZE, "num_workers": 0}  # fmt: skip


def split_dir(root, domain: str, seed: int, split: str) -> Path:
    return Path(root) / domain / f"seed{seed}" / split


def fake_bench(seeds=(0,)):
    return types.SimpleNamespace(
        DOMAINS=DOMAINS, SEEDS=tuple(seeds), MAX_DEPTH=MAX_DEPTH, split_dir=split_dir
    )


def make_fake_bench(root: Path, seeds=(0,), train: int = 3, val: int = 2) -> Path:
    """<root>/<domain>/seed<k>/{train (images, instances, pairs.json, depth), val, test}."""
    from westar.corrupt import corrupt_image
    from westar.pairs import make_pairs_file
    from westar.synth import render, write_sample

    for domain in DOMAINS:
        for seed in seeds:
            for split, n, base in (("train", train, 0), ("val", val, 100), ("test", val, 200)):
                folder = split_dir(root, domain, seed, split)
                for i in range(n):
                    scene_seed = 1000 * seed + base + i
                    family = "street" if domain == "streets" else "room"
                    scene = render(family, scene_seed, SIZE, SIZE)
                    image = scene.image
                    if domain == "fog":
                        image = corrupt_image(image, "fog", 4, seed=scene_seed, depth=scene.depth)
                    instances = scene.instances if split == "train" else None
                    write_sample(folder, f"{split}_{scene_seed}", image, scene.depth, instances)
                if split == "train":
                    make_pairs_file(folder / "images", folder / "depth", folder / "pairs.json")
    return root


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return make_fake_bench(tmp_path_factory.mktemp("bench") / "bench")


def test_runs_write_files_resume_and_skip(tiny_model, bench_root, tmp_path, monkeypatch):
    from westar.cli import main
    from westar.sweep import Run, _recipe, run_file, run_sweep, train_config
    from westar.train import Trainer

    out = tmp_path / "sweep"
    bench = fake_bench()
    # an interrupted run: 1 of 2 steps done, checkpoint written
    run = Run("westar", "fog", 0)
    cfg = train_config(run.method, _recipe(RECIPE), tiny_model, split_dir(bench_root, "fog", 0, "train"),
                       out / "work" / run.name, 0, "cpu")  # fmt: skip
    Trainer(cfg).fit(stop_after=1)
    assert not run_file(out, run).exists()

    kw = dict(methods=["source", "westar", "oracle"], domains=["fog", "streets"], seeds=[0],
              split="val", recipe=RECIPE, model=tiny_model, device="cpu", bench=bench, verbose=False)  # fmt: skip
    counts = run_sweep(bench_root, out, **kw)
    assert counts == {"done": 7, "skipped": 0, "left": 0}
    names = sorted(p.stem for p in (out / "runs").glob("*.json"))
    assert names == sorted(
        ["source__clean__seed0"]
        + [f"{m}__{d}__seed0" for m in ("source", "westar", "oracle") for d in ("fog", "streets")]
    )
    rec = json.loads(run_file(out, run).read_text())
    assert rec["train"]["resumed"] is True and rec["train"]["adapter_change"] > 0
    assert rec["config"]["ablation"] == "westar" and rec["config"]["steps"] == 2
    assert rec["config"]["lambda_w"] == _recipe(RECIPE)["lambda_w"]  # the recipe's
    assert rec["config"]["seed"] == 0
    assert rec["split"] == "val" and rec["images"] == 2 and rec["reported"] == "adapter"
    assert rec["torch_threads"] >= 1 and "git_commit" in rec and rec["wall_seconds"] > 0
    assert rec["eval_dir"].endswith("fog/seed0/val") and rec["max_depth"] == 50.0
    assert not (out / "work" / run.name / "checkpoints").exists()  # optimizer states gone
    assert (out / "work" / run.name / "adapter" / "adapter_config.json").is_file()
    oracle = json.loads(run_file(out, Run("oracle", "streets", 0)).read_text())
    assert oracle["config"]["pseudo_label"] == "depth" and oracle["config"]["hdn"] == "global"
    assert oracle["config"]["lambda_w"] == 0 and oracle["train"]["adapter_change"] > 0
    assert oracle["max_depth"] == 80.0
    source = json.loads(run_file(out, Run("source", "fog", 0)).read_text())
    assert "config" not in source and source["reported"] == "base"

    # a second invocation (the CLI, westar.bench faked) skips every finished run
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    monkeypatch.setitem(sys.modules, "westar.bench", types.ModuleType("westar.bench"))
    for k, v in vars(bench).items():
        setattr(sys.modules["westar.bench"], k, v)
    argv = ["sweep", "--data", str(bench_root), "--out", str(out), "--methods", "source",
            "westar", "oracle", "--domains", "fog", "streets", "--seeds", "0", "--split", "val",
            "--recipe", json.dumps(RECIPE), "--model", str(tiny_model), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["missing"] == [] and set(sweep["per_domain"]) == {"fog", "streets"}
    assert sweep["per_domain"]["streets"]["reference"] == "oracle on streets"
    assert Image.open(out / "ladder.png").size[0] > 100
    # another split in the same folder is refused
    with pytest.raises(ValueError, match="--split val run"):
        run_sweep(bench_root, out, **dict(kw, split="test"))
    with pytest.raises(ValueError, match="another recipe"):
        run_sweep(bench_root, out, **dict(kw, recipe=dict(RECIPE, lr=0.5)))


def test_recipe_and_plan_are_checked():
    from westar.sweep import _recipe, plan

    with pytest.raises(ValueError, match="unknown recipe keys"):
        _recipe({"lr": 1e-3, "learning_rate": 1})
    with pytest.raises(ValueError, match="set by the sweep"):
        _recipe({"seed": 3})
    with pytest.raises(ValueError, match="report"):
        _recipe({"report": "ema"})
    with pytest.raises(ValueError, match="unknown method"):
        plan(["full"], ["fog"], [0])
    names = [r.name for r in plan(["source", "westar"], ["clean", "streets"], [1])]
    assert names == ["source__clean__seed1", "source__streets__seed1", "westar__streets__seed1"]


def _record(method, domain, seed, abs_rel, delta1):
    return {"method": method, "domain": domain, "seed": seed, "split": "test",
            "abs_rel": abs_rel, "delta1": delta1}  # fmt: skip


def test_report_arithmetic_on_hand_made_runs(tmp_path):
    from westar.sweep import write_report

    runs = [
        _record("source", "clean", 0, 0.20, 0.90),
        _record("source", "clean", 1, 0.22, 0.88),
        _record("source", "fog", 0, 0.30, 0.70),
        _record("source", "fog", 1, 0.32, 0.68),
        _record("self_training", "fog", 0, 0.28, 0.72),
        _record("self_training", "fog", 1, 0.29, 0.67),
        _record("westar", "fog", 0, 0.24, 0.80),
        _record("westar", "fog", 1, 0.26, 0.78),
        _record("source", "streets", 0, 0.50, 0.50),
        _record("source", "streets", 1, 0.50, 0.52),
        _record("westar", "streets", 0, 0.45, 0.55),
        _record("westar", "streets", 1, 0.40, 0.50),
        _record("oracle", "streets", 0, 0.30, 0.70),
        _record("oracle", "streets", 1, 0.30, 0.72),
    ]
    for r in runs:
        path = tmp_path / "runs" / f"{r['method']}__{r['domain']}__seed{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    sweep = write_report(tmp_path, methods=["source", "self_training", "westar", "oracle"],
                         domains=["clean", "fog", "streets"], seeds=[0, 1])  # fmt: skip
    fog = sweep["per_domain"]["fog"]["methods"]
    approx = pytest.approx
    # gap recovery from seed means: (0.31 - 0.25) / (0.31 - 0.21) and (0.31 - 0.285) / 0.10
    assert fog["westar"]["gap_recovery"]["value"] == approx(0.6)
    assert fog["self_training"]["gap_recovery"]["value"] == approx(0.25)
    assert fog["westar"]["abs_rel"]["mean"] == approx(0.25)
    assert fog["westar"]["abs_rel"]["std"] == approx(0.01)
    assert fog["westar"]["vs_source"] == approx(
        {"abs_rel": -0.06, "delta1": 0.10, "wins": 2, "seeds": 2}
    )
    # self-training wins on seed 0 only (seed 1: better AbsRel, worse delta1)
    assert fog["self_training"]["vs_source"]["wins"] == 1
    assert fog["westar"]["vs_self_training"]["abs_rel"] == approx(-0.035)
    assert "gap_recovery" not in fog["source"] and "vs_source" not in fog["source"]
    streets = sweep["per_domain"]["streets"]["methods"]
    # natural shift: the oracle is the reference: (0.5 - 0.425) / (0.5 - 0.3)
    assert streets["westar"]["gap_recovery"]["value"] == approx(0.375)
    assert streets["oracle"]["gap_recovery"]["value"] == approx(1.0)
    assert sweep["average"]["westar"] == approx({"gap_recovery": (0.6 + 0.375) / 2, "domains": 2})
    assert sorted(sweep["missing"]) == [
        "oracle__fog__seed0", "oracle__fog__seed1",
        "self_training__streets__seed0", "self_training__streets__seed1",
    ]  # fmt: skip
    md = (tmp_path / "SWEEP.md").read_text()
    assert "60.0 %" in md and "37.5 %" in md and "48.7 %" in md and "oracle__fog__seed0" in md
    assert json.loads((tmp_path / "sweep.json").read_text())["average"] == sweep["average"]
    assert Image.open(tmp_path / "ladder.png").mode == "RGB"


def test_no_gap_gives_no_recovery(tmp_path):
    from westar.sweep import aggregate

    runs = {
        ("source", "clean", 0): _record("source", "clean", 0, 0.30, 0.7),
        ("source", "fog", 0): _record("source", "fog", 0, 0.29, 0.7),
        ("westar", "fog", 0): _record("westar", "fog", 0, 0.28, 0.7),
    }
    g = aggregate(runs)["per_domain"]["fog"]["methods"]["westar"]["gap_recovery"]
    assert g["value"] is None and "no gap" in g["note"]


def test_heldout_accuracy_is_aggregated_with_the_source_at_step_0():
    from westar.sweep import aggregate, format_markdown

    def trained(method, seed, start, end):
        r = _record(method, "fog", seed, 0.25, 0.8)
        r["train"] = {"heldout_acc_start": start, "heldout_acc": end}
        return r

    runs = {
        ("source", "clean", 0): _record("source", "clean", 0, 0.2, 0.9),
        ("source", "fog", 0): _record("source", "fog", 0, 0.3, 0.7),
        ("source", "fog", 1): _record("source", "fog", 1, 0.3, 0.7),
        ("westar", "fog", 0): trained("westar", 0, 0.70, 0.80),
        ("westar", "fog", 1): trained("westar", 1, 0.74, 0.90),
        ("self_training", "fog", 0): _record("self_training", "fog", 0, 0.3, 0.7),  # no holdout
    }
    sweep = aggregate(runs)
    fog = sweep["per_domain"]["fog"]["methods"]
    assert fog["westar"]["heldout_acc"]["mean"] == pytest.approx(0.85)
    assert fog["westar"]["heldout_acc"]["std"] == pytest.approx(0.05)
    assert fog["source"]["heldout_acc"]["mean"] == pytest.approx(0.72)  # step-0 values
    assert "heldout_acc" not in fog["self_training"]
    assert "0.850 ± 0.050" in format_markdown(sweep)


def test_parallel_workers_write_the_same_run_files(tiny_model, bench_root, tmp_path):
    from westar.sweep import run_sweep

    kw = dict(methods=["source", "westar"], domains=["fog"], seeds=[0], split="val",
              recipe=RECIPE, model=tiny_model, device="cpu", bench=fake_bench(), verbose=False)  # fmt: skip
    counts = run_sweep(bench_root, tmp_path / "par", workers=2, **kw)
    assert counts == {"done": 3, "skipped": 0, "left": 0}
    names = sorted(p.stem for p in (tmp_path / "par" / "runs").glob("*.json"))
    assert names == ["source__clean__seed0", "source__fog__seed0", "westar__fog__seed0"]
    rec = json.loads((tmp_path / "par" / "runs" / "westar__fog__seed0.json").read_text())
    assert rec["train"]["adapter_change"] > 0 and rec["images"] == 2
    assert run_sweep(bench_root, tmp_path / "par", workers=2, **kw)["skipped"] == 3
    with pytest.raises(ValueError, match="--parallel-runs"):
        run_sweep(bench_root, tmp_path / "par", workers=0, **kw)
