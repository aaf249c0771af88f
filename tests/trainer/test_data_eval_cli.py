"""Data formats and bad input, pair generation, metrics, and every CLI command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.helpers import make_dataset
from westar.cli import main
from westar.data import AdaptationDataset, DataError, collate, load_pairs, relation_to_label
from westar.evaluate import _summary, image_metrics
from westar.pairs import sample_pairs

ROOT = Path(__file__).resolve().parents[2]


def test_relation_to_label():
    assert relation_to_label("farther") == -1  # disparity: farther = smaller
    assert relation_to_label("closer") == 1
    assert relation_to_label("equal") == 0
    assert relation_to_label("farther", "depth") == 1


def test_pairs_are_consistent_with_depth(dataset_root):
    pairs = load_pairs(dataset_root / "pairs.json")
    assert len(pairs) == 6
    for stem, entry in pairs.items():
        depth = np.load(dataset_root / "depth" / f"{stem}.npy")
        assert len(entry["pairs"]) == 15  # 5 samples x 3 pairs
        for p in entry["pairs"]:
            (xa, ya), (xb, yb) = p["a"], p["b"]
            da, db = depth[ya, xa], depth[yb, xb]
            if max(da / db, db / da) < 1.03:
                assert p["relation"] == "equal"
            else:
                assert p["relation"] == ("farther" if da > db else "closer")
    rng = np.random.default_rng(0)
    assert all(p["relation"] == "equal" for p in sample_pairs(np.ones((4, 4)), rng))


def test_pairs_are_structured_samples():
    """Each sample: (farther, anchor), (closer, anchor), (farther, closer) on 3 points with
    d(farther) > d(anchor) > d(closer), so the relations cannot contradict each other."""
    rng = np.random.default_rng(1)
    depth = rng.uniform(1.0, 10.0, size=(20, 30)).astype(np.float32)
    depth[0, 0] = 0.0  # invalid: never sampled
    pairs = sample_pairs(depth, rng, samples=5, equal_ratio=1.03)
    assert len(pairs) == 15
    order = {"farther": 1, "closer": -1, "equal": 0}
    for far_anchor, close_anchor, far_close in zip(pairs[0::3], pairs[1::3], pairs[2::3]):
        far, anchor, close = far_anchor["a"], far_anchor["b"], close_anchor["a"]
        assert close_anchor["b"] == anchor and far_close["a"] == far and far_close["b"] == close
        d = {k: float(depth[y, x]) for k, (x, y) in (("f", far), ("a", anchor), ("c", close))}
        assert d["f"] > d["a"] > d["c"] > 0
        for pair, (u, v) in ((far_anchor, "fa"), (close_anchor, "ca"), (far_close, "fc")):
            ratio = max(d[u] / d[v], d[v] / d[u])
            want = 0 if ratio < 1.03 else (1 if d[u] > d[v] else -1)
            assert order[pair["relation"]] == want
    equal = sample_pairs(np.full((5, 5), 2.0) * np.linspace(1, 1.02, 5), rng, samples=5)
    assert {p["relation"] for p in equal} == {"equal"}  # all within the 1.03 ratio


def test_dataset_items_and_collate(dataset_root):
    ds = AdaptationDataset(
        dataset_root / "images", (28, 42), dataset_root / "instances", dataset_root / "pairs.json"
    )
    item = ds[0]
    assert item["image"].shape == (3, 28, 42) and item["instances"].shape == (1, 28, 42)
    assert item["pairs"][..., 0].max() < 28 and item["pairs"][..., 1].max() < 42
    ds = AdaptationDataset(  # 56 x 56 -> 28 x 28 needs no crop: every pair stays
        dataset_root / "images", (28, 28), dataset_root / "instances", dataset_root / "pairs.json"
    )
    item = ds[0]
    pairs = load_pairs(dataset_root / "pairs.json")["img_000"]["pairs"]
    assert item["labels"].tolist() == [relation_to_label(p["relation"]) for p in pairs]
    item2 = dict(ds[1], pairs=ds[1]["pairs"][:3], labels=ds[1]["labels"][:3])
    batch = collate([item, item2])
    assert batch["pairs"].shape == (2, 15, 2, 2)
    assert (batch["labels"][1, 3:] == -100).all()


def test_depth_and_instance_formats(tmp_path):
    from westar.data import read_depth, read_instances

    mm = np.array([[0, 1000], [2500, 65535]], np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    np.testing.assert_allclose(read_depth(tmp_path / "d.png"), mm / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png", 256.0), mm / 256.0, rtol=1e-6)
    np.save(tmp_path / "i.npy", mm.astype(np.int32))  # integer .npy: divided by the scale
    np.testing.assert_allclose(read_depth(tmp_path / "i.npy"), mm / 1000.0, rtol=1e-6)
    np.save(tmp_path / "f.npy", np.array([[np.nan, -1.0], [2.5, np.inf]], np.float32))
    assert read_depth(tmp_path / "f.npy").tolist() == [[0.0, 0.0], [2.5, 0.0]]  # 0 = invalid
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*16-bit"):
        read_depth(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*grayscale"):
        read_instances(tmp_path / "rgb.png")
    levels = np.stack([np.ones((4, 5), np.int64), np.arange(20).reshape(4, 5)])
    np.save(tmp_path / "lv.npy", levels)
    assert read_instances(tmp_path / "lv.npy").shape == (2, 4, 5)
    np.save(tmp_path / "neg.npy", -levels)
    with pytest.raises(DataError, match="neg.npy"):
        read_instances(tmp_path / "neg.npy")
    np.save(tmp_path / "flt.npy", levels.astype(np.float32))
    with pytest.raises(DataError, match="flt.npy.*integers"):
        read_instances(tmp_path / "flt.npy")


@pytest.fixture
def bad_root(tmp_path):
    return make_dataset(tmp_path / "bad", n=3, size=(28, 28))


def _dataset(root, **kw):
    return AdaptationDataset(
        root / "images", (28, 28), root / "instances", root / "pairs.json", **kw
    )


def test_corrupt_image_is_named(bad_root):
    (bad_root / "images" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="img_001.png"):
        _dataset(bad_root)
    with pytest.warns(UserWarning, match="img_001"):
        ds = _dataset(bad_root, skip_bad=True)
    assert len(ds) == 2


def test_wrong_mask_size_is_named(bad_root):
    Image.fromarray(np.ones((20, 28), np.uint16)).save(bad_root / "instances" / "img_002.png")
    with pytest.raises(DataError, match=r"img_002\.png.*28x20"):
        _dataset(bad_root)


def test_missing_mask_is_named(bad_root):
    (bad_root / "instances" / "img_000.png").unlink()
    with pytest.raises(DataError, match="img_000"):
        _dataset(bad_root)


def test_pair_outside_image_is_named(bad_root):
    doc = json.loads((bad_root / "pairs.json").read_text())
    doc["images"]["img_001"]["pairs"][2]["b"] = [28, 3]
    (bad_root / "pairs.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"pairs\.json.*img_001.*pairs\[2\]\.b.*outside"):
        _dataset(bad_root)


def test_missing_pairs_file_is_named(bad_root):
    with pytest.raises(DataError, match="nothere.json"):
        load_pairs(bad_root / "nothere.json")


def test_metrics_match_hand_computed_example():
    # gt disparity [1, .5, .25], pred [1, .5, .5]: least squares s = 1.25, t = -0.25,
    # aligned depth [1, 8/3, 8/3] vs gt [1, 2, 4]: AbsRel = (0 + 1/3 + 1/3) / 3 = 2/9,
    # ratios [1, 4/3, 3/2]: delta1 = 1/3. The 4th pixel has no ground truth (0).
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 0.5], [0.5, 9.0]])
    m = image_metrics(pred, gt, max_depth=10.0)
    assert m["scale"] == pytest.approx(1.25) and m["shift"] == pytest.approx(-0.25)
    assert m["abs_rel"] == pytest.approx(2 / 9)
    assert m["delta1"] == pytest.approx(1 / 3)
    gt2 = np.array([[2.0, 3.0], [5.0, 1.0]])
    perfect = image_metrics(3.0 / gt2 + 2.0, gt2, 10.0)
    assert perfect["abs_rel"] == pytest.approx(0, abs=1e-12) and perfect["delta1"] == 1.0
    summary = _summary({"a": m, "b": perfect, "c": None})
    assert summary["abs_rel"] == pytest.approx(1 / 9)
    assert summary["delta1"] == pytest.approx(2 / 3)
    assert summary["images_without_valid_depth"] == ["c"]
    # depth cap: pixels beyond max_depth are not scored
    capped = image_metrics(pred, np.array([[1.0, 2.0], [4.0, 50.0]]), max_depth=10.0)
    assert capped["pixels"] == 3


def test_cli_end_to_end(tiny_model, tmp_path):
    root = make_dataset(tmp_path / "ds", n=4, size=(56, 56), pairs=False)
    for p in (root / "instances").iterdir():
        p.unlink()
    assert main(["masks", "--data", str(root)]) == 0
    labels = np.asarray(Image.open(root / "instances" / "img_000.png"))
    assert labels.shape == (56, 56) and labels.min() >= 1
    assert (
        main(["masks", "--data", str(root), "--method", "slic", "--out", str(tmp_path / "s")]) == 0
    )
    assert main(["pairs", "--data", str(root), "--samples", "3"]) == 0
    assert len(load_pairs(root / "pairs.json")["img_001"]["pairs"]) == 9
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--data", str(root), "--output-dir", str(out),
            "--image-size", "56", "--steps", "2", "--batch-size", "2", "--no-progress",
            "--lr", "1e-3", "--log-every", "1"]  # fmt: skip
    assert main(args) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "teacher" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    report = tmp_path / "eval.json"
    eval_args = ["eval", "--model", str(tiny_model), "--adapter", str(out / "adapter"),
                 "--data", str(root), "--size", "56", "--max-depth", "10",
                 "--output", str(report), "--pictures", str(tmp_path / "pics")]  # fmt: skip
    assert main(eval_args) == 0
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"base", "adapted"}
    assert results["base"]["images"] == 4 and 0 <= results["adapted"]["delta1"] <= 1
    assert results["adapted"]["per_image"] != results["base"]["per_image"]  # adapter applied
    assert len(list((tmp_path / "pics").glob("*.png"))) == 4
    only = tmp_path / "only.json"
    assert main(eval_args[:-4] + ["--which", "adapter", "--limit", "1", "--output", str(only)]) == 0
    only_results = json.loads(only.read_text())["results"]
    assert set(only_results) == {"adapted"} and only_results["adapted"]["images"] == 1
    assert only_results["adapted"]["per_image"]["img_000"] == pytest.approx(
        results["adapted"]["per_image"]["img_000"]
    )
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model), "--adapter", str(out / "adapter"),
                 "--out", str(merged)]) == 0  # fmt: skip
    from peft import PeftModel
    from transformers import AutoModelForDepthEstimation

    x = torch.rand(1, 3, 56, 56)
    plain = AutoModelForDepthEstimation.from_pretrained(str(merged)).eval()
    base = AutoModelForDepthEstimation.from_pretrained(str(tiny_model)).eval()
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        a = plain(pixel_values=x).predicted_depth
        b = peft_model(pixel_values=x).predicted_depth
        c = AutoModelForDepthEstimation.from_pretrained(str(tiny_model))(pixel_values=x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c.predicted_depth)  # the adapter was folded in
    assert not any("lora" in k for k in plain.state_dict())


def test_cli_reports_bad_input_without_traceback(tiny_model, tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=2, size=(28, 28), pairs=False)
    code = main(["train", "--model", str(tiny_model), "--data", str(root), "--output-dir",
                 str(tmp_path / "o"), "--image-size", "28", "--steps", "1"])  # fmt: skip
    assert code == 2
    assert "pairs.json" in capsys.readouterr().err


def test_cli_names_the_bad_file(tiny_model, tmp_path, capsys):
    """What a user sees for a corrupt image, a missing model and a bad --image-size."""
    root = make_dataset(tmp_path / "ds", n=2, size=(28, 28))
    (root / "images" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    base = ["train", "--data", str(root), "--output-dir", str(tmp_path / "o"), "--steps", "1"]
    cases = [
        (["--model", str(tiny_model), "--image-size", "28"], "img_001.png: cannot read image"),
        (["--model", str(tmp_path / "missing")], "missing: model directory not found"),
        (["--model", str(tiny_model), "--image-size", "30"], "multiples of 14"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    eval_args = ["eval", "--model", str(tiny_model), "--data", str(root), "--size", "28"]
    (root / "images" / "img_001.png").unlink()
    (root / "depth" / "img_000.npy").unlink()
    assert main(eval_args + ["--output", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err  # issue 22: skipped like pairs does; none left: exit 2
    assert "no depth map for img_000.png: nothing left to evaluate" in err
    assert not (tmp_path / "e.json").exists()


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "westar", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0
    for name in ("train", "eval", "masks", "pairs", "merge"):
        assert name in res.stdout


def test_augmentations_are_photometric_and_seeded():
    from westar.augment import step_generator, strong_augment, weak_augment

    x = torch.rand(3, 3, 20, 24)
    assert weak_augment(x, step_generator(0, 0)) is x  # default weak view: the image
    a = strong_augment(x, step_generator(0, 5))
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, strong_augment(x, step_generator(0, 5)))  # (seed, step) decides
    assert not torch.equal(a, strong_augment(x, step_generator(0, 6)))
    assert not torch.allclose(a, x)
    gray = strong_augment(x, step_generator(0, 1), gray_prob=1.0, noise_prob=0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    # no geometry change: an edge stays where it is (blur only, no jitter/noise)
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    blurred = strong_augment(
        edge, step_generator(0, 0), jitter=0, hue=0, blur_prob=1.0, noise_prob=0.0, gray_prob=0
    )
    assert torch.allclose(blurred, blurred.flip(-1).neg() + 1, atol=1e-6)  # symmetric about 8
    assert (blurred[..., :8] < 0.5).all() and (blurred[..., 8:] > 0.5).all()
