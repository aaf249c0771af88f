"""Issue 22, output and behaviour: what `westar train / eval / corrupt / predict` print,
and what they refuse, on tiny inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.trainer.helpers import make_dataset
from westar.cli import main

ROOT = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"Traceback|\.py:\d+|warnings\.warn|FutureWarning")


@pytest.fixture
def four(tmp_path):
    return make_dataset(tmp_path / "ds", n=4, size=(28, 28))


def _train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--image-size", "28", "--steps", "2", "--batch-size", "2", "--no-progress",
            "--log-every", "1", "--save-every", "2", *extra]  # fmt: skip


def test_train_summary_and_no_future_warning(tiny_model, four, tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_train_args(tiny_model, four, out)) == 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [
        str(w.message) for w in caught
    ]
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{")  # no bare JSON line
    assert "trained to step 2 of 2" in text
    assert f"adapter (student): {out / 'adapter'}" in text
    nxt = next(line for line in text.splitlines() if line.startswith("next: "))
    assert f"westar eval --model {tiny_model} --adapter {out / 'adapter'}" in nxt
    # the printed next command runs as printed; it and merge warn no FutureWarning either
    argv = nxt.split()[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv + ["--image-size", "28"]) == 0
        merge = ["merge", "--model", str(tiny_model), "--adapter", str(out / "adapter")]
        assert main([*merge, "--out", str(tmp_path / "merged")]) == 0
    assert (out / "eval.json").is_file()
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_train_refuses_an_existing_run_before_loading_the_model(
    tiny_model, four, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    import westar.train

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(westar.train, "load_depth_model", no_model)
    assert main(_train_args(tiny_model, four, out)) == 2
    err = capsys.readouterr().err
    # a finished run without checkpoints: --resume could not continue it either (main's
    # refusal, tests/reliability/test_data_loss.py); with checkpoints the message names --resume
    assert err.count("\n") == 1 and f"{out} holds an earlier run (adapter)" in err


def test_train_needs_a_model(four, tmp_path, capsys):
    assert main(["train", "--data", str(four), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "source" in err


def test_eval_skips_images_without_depth_like_pairs(tiny_model, four, tmp_path, capsys):
    (four / "depth" / "img_001.npy").unlink()
    (four / "images" / "img_002.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    argv = ["eval", "--model", str(tiny_model), "--data", str(four), "--image-size", "28",
            "--out", str(tmp_path / "e.json"), "--pictures", str(tmp_path / "pics")]  # fmt: skip
    # a real process: what the terminal shows (pytest would capture the warnings)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WESTAR_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "westar.cli", *argv, "--skip-bad"],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 image without a depth map (img_001.png)" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("base: "))
    # 4 decimals, and the image count in the singular/plural it deserves
    assert re.fullmatch(r"base: AbsRel \d\.\d{4} delta1 \d\.\d{4} \(2 images\)", line), line
    # the bad image: one warning line naming it; no Python source line, no loading bar
    assert proc.stderr.startswith("westar eval: warning: skipping img_002.png"), proc.stderr
    assert proc.stderr.count("\n") == 1 and not NOISE.search(proc.stderr), proc.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["without_depth"] == ["img_001.png"] and report["results"]["base"]["images"] == 2


def test_eval_with_nothing_left_exits_2(tiny_model, four, tmp_path, capsys):
    for p in (four / "images").iterdir():
        p.write_bytes(b"not an image")
    argv = ["eval", "--model", str(tiny_model), "--data", str(four), "--skip-bad",
            "--out", str(tmp_path / "e.json")]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "None" not in captured.out
    errors = [x for x in captured.err.splitlines() if "error:" in x]
    assert len(errors) == 1 and "nothing left to evaluate" in errors[0]
    assert not (tmp_path / "e.json").exists()


def test_eval_pictures_have_column_labels(tiny_model, four, tmp_path):
    pics = tmp_path / "pics"
    assert main(["eval", "--model", str(tiny_model), "--data", str(four), "--image-size", "28",
                 "--out", str(tmp_path / "e.json"), "--pictures", str(pics)]) == 0  # fmt: skip
    picture = np.asarray(Image.open(pics / "img_000.png"))
    assert picture.shape == (14 + 28, 3 * 28, 3)  # a title row over input | base | gt
    head = picture[:14]
    for j in range(3):  # every column has dark text on white above its panel
        cell = head[:, j * 28 : (j + 1) * 28]
        assert (cell.min(axis=2) < 100).any() and (cell == 255).all(axis=2).mean() > 0.5


def test_corrupt_says_when_fog_has_no_depth(four, tmp_path, capsys):
    images = tmp_path / "only_images"
    shutil.copytree(four / "images", images)
    assert main(["corrupt", "--images", str(images), "--out", str(tmp_path / "f")]) == 0
    text = capsys.readouterr().out
    assert "no depth map for 4 fogged images" in text and "uniform" in text
    assert main(["corrupt", "--images", str(four), "--out", str(tmp_path / "g")]) == 0
    text = capsys.readouterr().out
    assert "uniform" not in text and "fog from depth maps for 4 images" in text


def test_predict_plural_and_source_model(four, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(four / "images" / "img_000.png", one)
    argv = ["predict", "--images", str(one), "--model", "source", "--out", str(tmp_path / "p"),
            "--image-size", "28", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 1 depth map to" in capsys.readouterr().out
    assert (tmp_path / "p" / "img_000.npy").is_file()


def test_source_is_the_shipped_model():
    import westar
    from westar.model import resolve_model_name

    shipped = Path(westar.__file__).parent / "assets" / "source_model"
    assert Path(resolve_model_name("source")) == shipped
    assert resolve_model_name("depth-anything/Depth-Anything-V2-Small-hf").startswith("depth-")
