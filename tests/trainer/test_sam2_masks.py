"""`westar masks --model`: SAM2 through transformers, two-level label maps, offline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from westar.cli import main
from westar.masks import Sam2TransformersSegmenter, paint_masks

S = 128  # the tiny model's square input


def make_tiny_sam2(path):
    """A ~0.1 M parameter random-init Sam2Model (Hiera with 5 blocks) saved to `path`: the
    GPU check's builder (scripts/gpu_train_check.py), at the tests' square side S."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_train_check.py"
    spec = importlib.util.spec_from_file_location("gpu_train_check_sam2", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_sam2(path, S)


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory):
    return make_tiny_sam2(tmp_path_factory.mktemp("sam2") / "tiny-sam2")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam2data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 70), (60, 60)]):
        rgb = np.full((h, w, 3), 40, np.uint8)
        rgb[h // 4 : h // 2, w // 5 : w // 2] = rng.integers(100, 255, 3)
        Image.fromarray(rgb).save(root / "images" / f"im{i}.png")
    return root


def test_levels_from_candidates():
    """Coarse = the largest kept mask per point; fine = every kept mask; thresholds apply."""
    seg = Sam2TransformersSegmenter.__new__(Sam2TransformersSegmenter)
    seg.pred_iou_thresh, seg.stability_thresh, seg.min_area = 0.5, 0.8, 4
    h, w = 20, 30
    yy, xx = np.mgrid[0:h, 0:w]

    def box(y0, y1, x0, x1):
        return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)

    masks = np.stack([
        np.stack([box(0, 20, 0, 15), box(2, 10, 2, 10), box(4, 6, 4, 6)]),    # point 0
        np.stack([box(0, 20, 15, 30), box(5, 15, 18, 28), box(8, 9, 20, 21)]),  # point 1
    ])  # fmt: skip
    ious = np.array([[0.9, 0.9, 0.9], [0.2, 0.9, 0.9]], np.float32)  # point 1's whole: bad IoU
    stable = np.array([[0.9, 0.5, 0.9], [0.9, 0.9, 0.9]], np.float32)  # point 0's part: unstable
    seg.candidates = lambda rgb: (masks, ious, stable)
    levels = seg(np.zeros((h, w, 3), np.uint8))
    assert levels.shape == (2, h, w) and levels.dtype == np.int32
    # coarse: point 0 -> left half; point 1 -> its part (whole rejected), 1 px mask too small
    want_coarse = paint_masks([masks[0, 0], masks[1, 1]], (h, w))
    np.testing.assert_array_equal(levels[0], want_coarse)
    assert set(np.unique(levels[0])) == {0, 1, 2}
    # fine: left half, 2x2 subpart on top of it, point 1's part (the 1 px one is too small)
    fine = levels[1]
    assert len(np.unique(fine[box(4, 6, 4, 6)])) == 1 and fine[4, 4] != fine[0, 0] != 0
    assert (fine[box(5, 15, 18, 28)] == fine[5, 18]).all() and fine[5, 18] not in (0, fine[0, 0])
    assert (fine[~(box(0, 20, 0, 15) | box(5, 15, 18, 28))] == 0).all()
    assert sorted(np.unique(fine)) == [0, 1, 2, 3]


def test_candidates_do_not_depend_on_the_prompt_batch(tiny_sam2, photos):
    rgb = np.asarray(Image.open(photos / "images" / "im0.png"))
    one = Sam2TransformersSegmenter(tiny_sam2, "cpu", points_per_side=3, points_per_batch=1)
    many = Sam2TransformersSegmenter(tiny_sam2, "cpu", points_per_side=3, points_per_batch=5)
    m1, i1, s1 = one.candidates(rgb)
    m2, i2, s2 = many.candidates(rgb)
    assert m1.shape == (9, 3, 48, 70) and i1.shape == s1.shape == (9, 3)
    np.testing.assert_allclose(i1, i2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)
    assert (m1 != m2).mean() < 1e-3  # logits on the threshold may flip
    assert 0 < m1.mean() < 1  # a random model still cuts the image somewhere


def test_cli_writes_two_levels_that_train(tiny_sam2, photos, tmp_path, tiny_model):
    from westar.data import AdaptationDataset, read_instances

    out = tmp_path / "instances"
    argv = ["masks", "--images", str(photos / "images"), "--out", str(out), "--model",
            str(tiny_sam2), "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-thresh", "0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    for i, (h, w) in enumerate([(48, 70), (60, 60)]):
        levels = read_instances(out / f"im{i}.npy")
        assert levels.shape == (2, h, w)
        assert levels[1].max() >= levels[0].max() >= 1  # the fine level has more parts
    before = (out / "im0.npy").read_bytes()
    assert main(argv) == 0 and (out / "im0.npy").read_bytes() == before  # kept
    ds = AdaptationDataset(photos / "images", (28, 28), out)
    assert ds[0]["instances"].shape == (2, 28, 28)
    # the fallback still works next to it
    assert main(["masks", "--images", str(photos / "images"), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "im0.png").is_file()


def test_nothing_is_downloaded(tmp_path, photos, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = ["masks", "--images", str(photos / "images"), "--out", str(tmp_path / "o")]
    assert main(argv + ["--model", "facebook/sam2.1-hiera-tiny"]) == 2
    assert "facebook/sam2.1-hiera-tiny" in capsys.readouterr().err
    assert main(argv + ["--model", str(tmp_path / "no-such-dir")]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
