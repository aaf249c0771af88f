"""Round two (issue 21): inputs that gave a silently wrong result (exit 0) are handled or
refused with one line naming the flag or file. docs/reliability.md, "Silently wrong"."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.test_outputs import error_line
from tests.trainer.helpers import make_dataset
from westar.cli import main


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", n=2, size=(28, 28))


def exif_rotated_jpeg(path: Path, stored: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: the camera was turned; show it turned by 90 degrees
    Image.fromarray(stored).save(path, exif=exif, quality=95)


def test_exif_rotated_jpeg_is_read_as_shown(tiny_model, tmp_path):
    from westar.data import image_size, read_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white as stored
    path = tmp_path / "photo.jpg"
    exif_rotated_jpeg(path, stored)
    shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    rgb = read_image(path)
    assert rgb.shape == (40, 20, 3) and image_size(path) == (40, 20)
    assert np.abs(rgb.astype(int) - shown.astype(int)).max() < 8
    out = tmp_path / "o"
    args = ["predict", str(path), "--model", str(tiny_model), "--out", str(out),
            "--formats", "npy", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert np.load(out / "photo.npy").shape == (40, 20)  # as shown, not as stored (20, 40)


def test_hand_edited_bench_folder_is_not_reused(tmp_path, capsys):
    from westar.bench.build import FILES_JSON, build, split_dir

    root = tmp_path / "bench"
    build(root, seeds=[0], domains=["clean"], quick=True, progress=False)
    folder = split_dir(root, "clean", 0, "test")
    assert (folder / FILES_JSON).is_file()
    image = sorted((folder / "images").iterdir())[0]
    original = image.read_bytes()
    Image.fromarray(np.zeros((126, 126, 3), np.uint8)).save(image)  # edited by hand
    with pytest.raises(
        FileExistsError, match=rf"{folder}: edited since it was built \(changed: images/"
    ):
        build(root, seeds=[0], domains=["clean"], quick=True, progress=False)
    args = ["bench", "--root", str(root), "--out", str(tmp_path / "r"), "--quick",
            "--domains", "clean", "--seeds", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "edited since it was built" in error_line(capsys.readouterr().err)
    build(root, seeds=[0], domains=["clean"], quick=True, progress=False, overwrite=True)
    assert image.read_bytes() == original  # rebuilt: the benchmark's image again


@pytest.mark.parametrize(
    "flags, message",
    [(["--limit", "-1"], "--limit must be a positive number of images, got -1"),
     (["--limit", "0"], "--limit must be a positive number of images, got 0"),
     (["--max-depth", "-1"], "--max-depth must be a positive number, got -1.0"),
     (["--max-depth", "nan"], "--max-depth must be a positive number, got nan"),
     (["--depth-scale", "0"], "--depth-scale must be a positive number, got 0.0"),
     (["--min-depth", "5", "--max-depth", "2"], "--max-depth 2.0 must be larger than --min-depth 5.0")],
)  # fmt: skip
def test_eval_flags_that_score_nothing_are_refused(
    tiny_model, data, tmp_path, flags, message, capsys
):
    out = tmp_path / "e.json"
    _eval_fails(tiny_model, data, out, flags, message, capsys)
    assert not out.exists()


def test_eval_that_scores_no_image_exits_2(tiny_model, data, tmp_path, capsys):
    for f in (data / "depth").iterdir():
        np.save(f, np.full((28, 28), 500.0, np.float32))  # every pixel beyond --max-depth 80
    message = "no image has valid depth in (--min-depth 0.001, --max-depth 80.0]"
    _eval_fails(tiny_model, data, tmp_path / "e.json", [], message, capsys)


def _eval_fails(model, data, out, flags, message, capsys):
    args = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), *flags]
    assert main(args) == 2
    assert message in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "flags, message",
    [(["--samples", "-3"], "--samples must be a positive number of anchors per image, got -3"),
     (["--samples", "0"], "--samples must be a positive number of anchors per image, got 0"),
     (["--equal-ratio", "0.5"], "--equal-ratio must be a ratio >= 1, got 0.5"),
     (["--max-depth", "-1"], "--max-depth must be a positive number"),
     (["--depth-scale", "0"], "--depth-scale must be a positive number")],
)  # fmt: skip
def test_pairs_flags_that_write_no_pairs_are_refused(data, tmp_path, flags, message, capsys):
    out = tmp_path / "p.json"
    assert main(["pairs", "--data", str(data), "--out", str(out), *flags]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()


def truncate_jpeg(path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-300])  # the header stays intact


def test_predict_finds_bad_images_before_writing_and_skip_bad_skips_them(
    tiny_model, data, tmp_path, capsys
):
    images = data / "images"
    truncate_jpeg(images / "zz_broken.jpg")  # sorted last: was found after the others were written
    out = tmp_path / "o"
    args = ["predict", str(images), "--model", str(tiny_model), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert f"{images / 'zz_broken.jpg'}: cannot read image" in error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing written before the bad file was found
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--skip-bad"]) == 0
    assert any("skipping zz_broken.jpg" in str(w.message) for w in caught)
    assert sorted(p.stem for p in out.glob("*.npy")) == ["img_000", "img_001"]


def test_pairs_json_width_must_be_a_positive_integer(data):
    from westar.data import DataError, load_pairs

    doc = json.loads((data / "pairs.json").read_text())
    for bad in (True, 0, -28, 28.5, "28"):
        doc["images"]["img_000"]["width"] = bad
        (data / "pairs.json").write_text(json.dumps(doc))
        with pytest.raises(DataError, match="needs positive integer 'width' and 'height'"):
            load_pairs(data / "pairs.json")
