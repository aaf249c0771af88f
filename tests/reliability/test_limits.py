"""Round two (issue 21): no input makes a command hang or eat the memory: bounded image
pixels, inference sizes and aspect ratios, annotate samples. docs/reliability.md."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.test_outputs import error_line
from westar.cli import main


def test_extreme_aspect_ratio_is_bounded_by_the_long_side(tiny_model, tmp_path, capsys):
    from westar.evaluate import MAX_ASPECT, inference_size

    # was 126 x 630000 (29 min, 6.5 GB on a 518 model): now the long side is capped
    assert inference_size(1, 5000, 126) == (14, MAX_ASPECT * 126)
    assert inference_size(5000, 1, 126) == (MAX_ASPECT * 126, 14)
    assert inference_size(480, 640, 126) == (126, 168)  # ordinary photos: unchanged
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 5000, 3), 90, np.uint8)).save(strip)
    t0 = time.perf_counter()
    args = ["predict", str(strip), "--model", str(tiny_model), "--out", str(tmp_path / "o"),
            "--no-progress", "--formats", "npy"]  # fmt: skip
    assert main(args) == 0
    assert time.perf_counter() - t0 < 60
    assert np.load(tmp_path / "o" / "strip.npy").shape == (1, 5000)  # back at its own size


def test_too_many_pixels_is_one_line_before_the_model_loads(tmp_path, capsys):
    # 10000 x 10000 (100 M pixels, above the limit of about 89 M; PIL only warns): a 1-bit
    # PNG of a few KB, which decodes to 10**8 pixels (0.3 GB as RGB)
    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big)
    args = [
        "predict",
        str(big),
        "--model",
        str(tmp_path / "no-model"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{big}: image is 10000x10000 = 100000000 pixels, more than the limit" in line
    assert "--max-pixels" in line  # the way to raise it
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(small)
    assert main(["predict", str(small), "--model", "x", "--out", "o", "--max-pixels", "700"]) == 2
    assert "784 pixels, more than the limit of 700" in error_line(capsys.readouterr().err)


def test_decompression_bomb_is_one_line(tmp_path, capsys):
    from westar.data import DataError, image_size, read_image

    bomb = tmp_path / "bomb.png"  # 196 M pixels: PIL's DecompressionBombError, not OSError
    Image.new("1", (14000, 14000)).save(bomb)
    for reader in (image_size, read_image):
        with pytest.raises(DataError, match=r"bomb\.png: .*exceeds limit"):
            reader(bomb)
    (tmp_path / "images").mkdir()
    bomb.rename(tmp_path / "images" / "bomb.png")
    assert main(["masks", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "m")]) == 2
    assert "bomb.png" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "IMG", "--out", "OUT", "--image-size", "100000"],
        ["eval", "--data", "DATA", "--size", "100000"],
        ["annotate", "--images", "DATA", "--out", "OUT/p.json", "--size", "100000"],
    ],
)
def test_inference_size_is_bounded(tiny_model, tmp_path, args, capsys):
    from westar.evaluate import MAX_INFERENCE_SIZE

    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "a.png")
    subs = {"IMG": str(tmp_path / "a.png"), "OUT": str(tmp_path), "DATA": str(tmp_path)}
    args = [subs.get(a, a.replace("OUT", str(tmp_path))) for a in args]
    assert main([*args, "--model", str(tiny_model)]) == 2
    flag = "--image-size" if args[0] == "predict" else "--size"
    line = error_line(capsys.readouterr().err)
    assert f"{flag} must be in 1..{MAX_INFERENCE_SIZE} pixels, got 100000" in line


def test_annotate_samples_are_bounded(tmp_path, capsys):
    Path(tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    t0 = time.perf_counter()
    args = ["annotate", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "p.json"),
            "--samples", "3000", "--port", "0"]  # fmt: skip
    assert main(args) == 2  # was: the page froze proposing 9000 points per image
    assert "--samples must be in 1..50 per image, got 3000" in error_line(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "p.json").exists()
