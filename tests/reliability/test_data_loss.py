"""Round two (issue 21): nothing the user had is replaced without --overwrite, and an
input never. Cases of docs/reliability.md, "Data loss (round two)"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.test_outputs import error_line, tree
from tests.trainer.helpers import make_dataset, train_config
from westar.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", n=2, size=(28, 28))


def test_pairs_never_replaces_an_existing_file_without_overwrite(data, capsys):
    pairs = data / "pairs.json"
    doc = json.loads(pairs.read_text())
    doc["images"]["img_000"]["annotate"] = {"samples": [], "skipped": True}  # a person's work
    pairs.write_text(json.dumps(doc))
    before = pairs.read_bytes()
    assert main(["pairs", "--data", str(data)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{pairs}: exists" in line and "--overwrite" in line
    assert pairs.read_bytes() == before
    assert main(["pairs", "--data", str(data), "--overwrite"]) == 0
    assert "annotate" not in json.loads(pairs.read_text())["images"]["img_000"]


def test_eval_pictures_never_into_an_input_folder(tiny_model, data, capsys):
    before = tree(data)
    for folder in ("images", "depth"):
        args = ["eval", "--model", str(tiny_model), "--data", str(data),
                "--pictures", str(data / folder), "--output", str(data.parent / "e.json")]  # fmt: skip
        assert main(args) == 2
        line = error_line(capsys.readouterr().err)
        assert "--pictures is an input folder" in line and str(data / folder) in line
    assert tree(data) == before and not (data.parent / "e.json").exists()


def test_eval_output_never_replaces_a_file_that_is_not_a_report(tiny_model, data, capsys):
    pairs = data / "pairs.json"
    before = pairs.read_bytes()
    args = ["eval", "--model", str(tiny_model), "--data", str(data), "--output", str(pairs)]
    assert main(args) == 2
    assert f"{pairs}: --out exists and is not a westar eval report" in error_line(
        capsys.readouterr().err
    )
    assert pairs.read_bytes() == before
    report = data.parent / "eval.json"  # an earlier report is replaced, as before
    args[-1] = str(report)
    assert main(args) == 0 and main(args) == 0
    assert "results" in json.loads(report.read_text())


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_masks_never_writes_into_the_image_folder(data, overwrite, capsys):
    # PNG photos would be replaced; JPEG photos would get a PNG of the same stem beside them
    Image.open(data / "images" / "img_001.png").convert("RGB").save(data / "images" / "b.jpg")
    before = tree(data / "images")
    args = ["masks", "--data", str(data), "--out", str(data / "images"), *overwrite]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{data / 'images'}: --out is the image folder" in line
    assert tree(data / "images") == before


def test_train_refuses_a_finished_run_without_checkpoints(
    tiny_model, dataset_root, tmp_path, capsys
):
    from westar.train import Trainer

    out = tmp_path / "run"
    Trainer(train_config(tiny_model, dataset_root, out, steps=1, save_every=1)).fit()
    import shutil

    shutil.rmtree(out / "checkpoints")  # pruned by hand: the adapter is all that is left
    before = tree(out)
    for extra in ([], ["--resume"]):
        args = ["train", "--model", str(tiny_model), "--data", str(dataset_root),
                "--output-dir", str(out), "--image-size", "56", "--steps", "1",
                "--no-progress", "--no-tensorboard", *extra]  # fmt: skip
        assert main(args) == 2
        line = error_line(capsys.readouterr().err)
        assert f"{out} holds an earlier run (adapter, teacher)" in line
    assert tree(out) == before


@pytest.mark.parametrize("name", ["metrics.csv", "config.json", ".westar.lock"])
def test_train_never_writes_through_a_symlink(tiny_model, dataset_root, tmp_path, name, capsys):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / name).symlink_to(victim)
    args = ["train", "--model", str(tiny_model), "--data", str(dataset_root),
            "--output-dir", str(out), "--image-size", "56", "--steps", "1", "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{out / name}" in line and "symbolic link" in line
    assert victim.read_text() == "precious"


def test_second_annotate_on_the_same_out_is_refused(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.png")
    out = tmp_path / "pairs.json"
    args = ["annotate", "--images", str(images), "--out", str(out), "--port", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "westar.cli", *args], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until it serves
            line = first.stdout.readline()
            if "open http" in line or not line:
                break
        assert first.poll() is None, "the first annotate did not start"
        assert main(args) == 2
        line = error_line(capsys.readouterr().err)
        assert f"another westar annotate (pid {first.pid})" in line and "--out" in line
    finally:
        first.kill()
        first.wait()
    # killed: the lock is free again (taken over, then removed when the second one ends)
    args[2] = str(tmp_path / "missing")
    assert main(args) == 2
    assert "image folder not found" in error_line(capsys.readouterr().err)
    assert not (tmp_path / ".pairs.json.lock").exists()


def test_predict_never_replaces_an_input_even_with_overwrite(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "a_color"):  # a photo named like the colour output of a.png
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(
            folder / f"{stem}.png"
        )
    before = tree(folder)
    args = ["predict", str(folder), "--model", str(tiny_model), "--out", str(folder),
            "--overwrite", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{folder / 'a_color.png'}: output for a.png would replace an input image" in line
    assert tree(folder) == before
