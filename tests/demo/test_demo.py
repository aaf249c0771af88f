"""`westar demo --quick` end to end: the CI test of the whole path (data, source eval,
WeSTAR training, eval, table, picture). Whether adaptation helps is measured in
RESULTS.md (`westar sweep`, docs/sweep.md), not here; that training did something
is (`assert_adapted`: the adapter moved the weights and changed the predictions), and a
no-op adaptation fails that check (`test_noop_adaptation_fails_the_check`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "westar" / "assets" / "source_model"


def _model_args(tmp_path: Path) -> list[str]:
    """The shipped source model, or (before it exists) a tiny random-init one."""
    if (SOURCE / "config.json").exists():
        return []
    from tests.trainer.helpers import make_tiny_depth_anything

    return ["--model", str(make_tiny_depth_anything(tmp_path / "tiny"))]


def _default_shift() -> str:
    from westar.demo import DEFAULTS

    return DEFAULTS.corruptions[0]


def _check_metrics(out: Path, variants: list[str], corruption: str | None = None) -> dict:
    corruption = corruption or _default_shift()
    report = json.loads((out / "metrics.json").read_text())
    s = report["settings"]
    assert s["quick"] is True and s["corruptions"] == [corruption] and s["variants"] == variants
    res = report["results"][corruption]
    for name in ["source", *variants]:
        m = res[name]
        assert m["images"] == s["eval_images"]
        assert math.isfinite(m["abs_rel"]) and m["abs_rel"] >= 0
        assert math.isfinite(m["delta1"]) and 0 <= m["delta1"] <= 1
        assert len(res["per_image"][name]) == s["eval_images"]
    assert report["wall_seconds"] > 0
    return report


def assert_adapted(report: dict) -> None:
    """Training did something: each variant's adapter moved the weights from the base
    model (sum ||scaling B A||^2 > 0; a fresh LoRA adapter has B = 0) and its per-image
    metrics on the held-out split differ from the source's. A no-op adaptation (lr 0, a
    trainer that skips its steps, an adapter that is not loaded) fails both."""
    for c, by_variant in report["training"].items():
        res = report["results"][c]
        for v, t in by_variant.items():
            assert t["adapter_change"] > 1e-12, f"{c}/{v}: the adapter did not move"
            source, adapted = res["per_image"]["source"], res["per_image"][v]
            assert adapted != source, f"{c}/{v}: predictions identical to the source's"


def test_demo_quick_cli(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "westar",
            "demo",
            "--quick",
            "--out",
            str(out),
            "--device",
            "cpu",
            *_model_args(tmp_path),
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 90, f"westar demo --quick took {elapsed:.0f} s"
    # the printed table
    assert "AbsRel" in proc.stdout and "delta1" in proc.stdout
    assert "source" in proc.stdout and "adapted (WeSTAR)" in proc.stdout
    report = _check_metrics(out, ["westar"])
    assert_adapted(report)
    # the picture: 6 columns (input, ground truth, source, adapted, and the two error maps)
    pic = Image.open(out / "demo.png")
    size = report["settings"]["image_size"]
    assert pic.mode == "RGB" and pic.width == 6 * size and pic.height > size
    # the training run left its adapters; the training split has no ground truth
    shift = _default_shift()
    run = out / "runs" / shift / "westar"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "teacher" / "adapter_config.json").is_file()
    train = out / "data" / shift / "train"
    assert (train / "pairs.json").is_file() and (train / "instances").is_dir()
    assert not (train / "depth").exists()
    assert (out / "data" / shift / "test" / "depth").is_dir()


def test_run_demo_ladder_api(tmp_path):
    """The Python API with the ablation ladder (two variants to stay quick)."""
    from westar.demo import QUICK, format_table, run_demo

    model = None if (SOURCE / "config.json").exists() else _model_args(tmp_path)[1]
    cfg = dataclasses.replace(
        QUICK,
        output=tmp_path / "ladder",
        corruptions="gaussian_noise",
        steps=2,
        variants=("self_training", "westar"),
        model=model,
        device="cpu",
        progress=False,
        verbose=False,
    )
    report = run_demo(cfg)
    _check_metrics(tmp_path / "ladder", ["self_training", "westar"], "gaussian_noise")
    assert_adapted(report)
    text = format_table(report)
    assert "plain self-training" in text and "(WeSTAR)" in text


def test_noop_adaptation_fails_the_check(tmp_path):
    """The quick test's check is not vacuous: with lr 0 the trainer runs all its steps and
    writes adapters, yet they equal the base model, and `assert_adapted` fails."""
    from westar.demo import QUICK, run_demo

    model = None if (SOURCE / "config.json").exists() else _model_args(tmp_path)[1]
    cfg = dataclasses.replace(QUICK, output=tmp_path / "noop", lr=0.0, steps=2, model=model,
                              device="cpu", progress=False, verbose=False)  # fmt: skip
    report = run_demo(cfg)
    _check_metrics(tmp_path / "noop", ["westar"])  # the files are all there ...
    assert report["training"][_default_shift()]["westar"]["adapter_change"] == 0.0
    with pytest.raises(AssertionError, match="did not move"):  # ... and the check fails
        assert_adapted(report)


def test_demo_config_rejects_bad_arguments(tmp_path):
    from westar.demo import QUICK, DemoConfig

    with pytest.raises(ValueError, match="unknown shift"):
        DemoConfig(output=str(tmp_path), corruptions="snow")
    with pytest.raises(ValueError, match="multiple of 14"):
        dataclasses.replace(QUICK, image_size=50)
    with pytest.raises(ValueError, match="unknown variant"):
        dataclasses.replace(QUICK, variants=("full",))  # the trainer's alias, not a rung
    assert DemoConfig(corruptions="all").corruptions == tuple(
        sorted(__import__("westar.corrupt").corrupt.CORRUPTIONS)
    )


def test_cli_builds_the_demo_config():
    from westar.cli import build_parser
    from westar.config import LADDER
    from westar.demo import DEFAULTS, QUICK, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["demo"])) == DEFAULTS
    cfg = config_from_args(parse(["demo", "--quick", "--ablation", "--teacher", "--lr", "0.5"]))
    assert cfg == dataclasses.replace(
        QUICK, variants=tuple(LADDER), adapted_weights="teacher", lr=0.5
    )


# The recipe-tuning runs of RESULTS.md: demo seed 100, 64 training and 32 validation scenes
# (eval_split="val"); seed 100's training block is seed 0's test block.
TUNING = {("train", 100, 64), ("val", 100, 32)}
REPORTED_SEEDS = (1, 2, 3)  # RESULTS.md's headline table


def test_reported_seeds_do_not_meet_tuning_or_each_other():
    from westar.demo import DEFAULTS, scene_seeds

    tuned = set()
    for split, seed, n in TUNING:
        tuned |= set(scene_seeds(split, seed, n))
    assert tuned & set(scene_seeds("test", 0, DEFAULTS.eval_images))  # the recorded flaw
    size = {"train": DEFAULTS.train_images, "test": DEFAULTS.eval_images}
    blocks = [
        set(scene_seeds(split, seed, size[split]))
        for seed in REPORTED_SEEDS
        for split in ("train", "test")
    ]
    for i, b in enumerate(blocks):
        assert not b & tuned
        # nor the source model's pretraining (seeds from 1000) and evaluation (10^7 ...)
        assert min(b) >= 20_000_000
        for other in blocks[i + 1 :]:
            assert not b & other


def test_scene_seeds_rejects_bad_arguments():
    from westar.demo import scene_seeds

    with pytest.raises(ValueError, match="unknown split"):
        scene_seeds("dev", 0, 4)
    with pytest.raises(ValueError, match="at most"):
        scene_seeds("train", 0, 10**6)


def test_ablation_prints_the_ladder_in_the_papers_order(tmp_path):
    from westar.config import LADDER
    from westar.demo import QUICK, format_table, run_demo

    model = None if (SOURCE / "config.json").exists() else _model_args(tmp_path)[1]
    cfg = dataclasses.replace(QUICK, output=tmp_path / "abl", steps=1, variants=tuple(LADDER),
                              model=model, device="cpu", progress=False, verbose=False)  # fmt: skip
    report = run_demo(cfg)
    assert report["settings"]["variants"] == list(LADDER)
    text = format_table(report)
    labels = ["Source (zero-shot)", "plain self-training", "grid HDN", "SA-HDN",
              "+ weak labels", "+ regularization (WeSTAR)"]  # fmt: skip
    at = [text.index(label) for label in labels]
    assert at == sorted(at)


def test_streets_shift_builds_street_scenes_without_corruption(tmp_path):
    """The natural shift: street scenes (westar.synth.render("street", ...)) written as
    they are rendered, with the benchmark's 80 m depth cap."""
    import numpy as np

    from westar.demo import make_target_domain, max_depth, scene_seeds
    from westar.synth import render

    dirs = make_target_domain(tmp_path / "d", "streets", 3, seed=1, train_images=2,
                              eval_images=2, image_size=56, progress=False)  # fmt: skip
    first = scene_seeds("test", 1, 2)[0]
    written = np.asarray(Image.open(dirs["eval"] / "images" / f"test_{first:08d}.png"))
    np.testing.assert_array_equal(written, render("street", first, 56, 56).image)
    assert (dirs["train"] / "pairs.json").is_file() and not (dirs["train"] / "depth").exists()
    assert max_depth("streets") == 80.0 and max_depth("fog") == 50.0


def test_every_recipe_field_is_a_demo_default(tmp_path, monkeypatch):
    """Every TrainConfig field a demo run sets differently from the trainer's defaults is
    a DemoConfig field (westar.demo.DEFAULTS), a per-run field, or the variant's own."""
    from westar import demo, model, train
    from westar.config import ABLATIONS, TrainConfig

    seen = []

    class FakeTrainer:
        def __init__(self, cfg):
            seen.append(cfg)

        def fit(self):
            return {"loss": 1.0}

    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    monkeypatch.setattr(model, "adapter_delta_sq_norm", lambda path: 1.0)
    cfg = dataclasses.replace(demo.DEFAULTS, progress=False)
    demo._train_variant(cfg, "westar", tmp_path / "data", tmp_path / "run", tmp_path, "cpu")
    (run_cfg,) = seen
    defaults = TrainConfig()
    per_run = {"model", "data", "output_dir", "seed", "save_every", "keep_checkpoints",
               "tensorboard", "progress", "cpu", "ablation"}  # fmt: skip
    differs = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(run_cfg, f.name) != getattr(defaults, f.name)}  # fmt: skip
    unexplained = differs - per_run - set(demo.DemoConfig.RECIPE) - set(ABLATIONS["westar"])
    assert not unexplained
    for name in demo.DemoConfig.RECIPE:  # and the run uses the demo's value of each
        want = getattr(cfg, name)
        want = (want, want) if name == "image_size" else want
        assert getattr(run_cfg, name) == want, name
