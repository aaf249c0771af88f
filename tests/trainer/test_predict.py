"""`westar predict`: depth at the original resolution, batched, base / adapter / merged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from westar.cli import main

SIZES = [(40, 62), (61, 40), (40, 62), (50, 50)]  # (H, W); two share an inference size


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from westar.model import add_lora, load_depth_model

    torch.manual_seed(0)
    peft_model = add_lora(load_depth_model(str(tiny_model)).model)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(path))
    return path


def _reference(model_dir, photo: np.ndarray, size: int, adapter=None) -> np.ndarray:
    """One image at a time through the evaluation code path (peft model unmerged)."""
    from westar.evaluate import _predict_image
    from westar.model import load_depth_model

    dm = load_depth_model(str(model_dir))
    net = dm.model.eval()
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(adapter)).eval()
    return _predict_image(net, dm, photo, size, torch.device("cpu"))


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> None:
    """Equal up to `rel` of b's largest magnitude (the tiny random model's outputs are
    ~1e-6, so a fixed atol would accept anything)."""
    scale = float(np.abs(b).max())
    assert scale > 0 and a.shape == b.shape
    assert float(np.abs(a - b).max()) <= rel * scale


def _run(*argv) -> int:
    return main(["predict", *map(str, argv), "--no-progress"])


def test_outputs_at_original_resolution_match_one_by_one(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    assert _run(photos, "--model", tiny_model, "--out", out, "--image-size", 42,
                "--batch-size", 3) == 0  # fmt: skip
    for i, (h, w) in enumerate(SIZES):
        depth = np.load(out / f"p{i}.npy", allow_pickle=False)
        assert depth.dtype == np.float32 and depth.shape == (h, w)
        rgb = np.asarray(Image.open(photos / f"p{i}.png"))
        assert_close(depth, _reference(tiny_model, rgb, 42))
        png16 = Image.open(out / f"p{i}_16bit.png")
        assert png16.mode.startswith("I;16") and png16.size == (w, h)
        q = np.asarray(png16).astype(np.float64)
        assert q.min() == 0 and q.max() == 65535
        expect = (depth - depth.min()) / (depth.max() - depth.min()) * 65535
        assert np.abs(q - expect).max() <= 0.5 + 1e-6
        colour = Image.open(out / f"p{i}_color.png")
        assert colour.mode == "RGB" and colour.size == (w, h)


def test_batch_size_does_not_change_results(tiny_model, photos, tmp_path):
    for bs in (1, 4):
        assert _run(photos, "--model", tiny_model, "--out", tmp_path / f"b{bs}",
                    "--batch-size", bs, "--formats", "npy") == 0  # fmt: skip
    for i in range(len(SIZES)):
        a, b = (np.load(tmp_path / f"b{bs}" / f"p{i}.npy") for bs in (1, 4))
        assert_close(a, b)
    assert not list((tmp_path / "b1").glob("*.png"))  # --formats npy: nothing else


def test_adapter_and_merged_model_agree(tiny_model, adapter, photos, tmp_path):
    from westar.merge import merge_adapter

    one = photos / "p1.png"
    assert _run(one, "--model", tiny_model, "--adapter", adapter, "--out", tmp_path / "a",
                "--formats", "npy") == 0  # fmt: skip
    merged = merge_adapter(str(tiny_model), str(adapter), str(tmp_path / "merged"))
    assert _run(one, "--model", merged, "--out", tmp_path / "m", "--formats", "npy") == 0
    assert _run(one, "--model", tiny_model, "--out", tmp_path / "b", "--formats", "npy") == 0
    with_adapter = np.load(tmp_path / "a" / "p1.npy")
    rgb = np.asarray(Image.open(one))
    size = 126  # the tiny model's native size
    assert_close(with_adapter, _reference(tiny_model, rgb, size, adapter))
    assert_close(with_adapter, np.load(tmp_path / "m" / "p1.npy"))
    base = np.load(tmp_path / "b" / "p1.npy")
    assert np.abs(with_adapter - base).max() > 0.05 * np.abs(base).max()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["p1.npy"]


def test_bad_inputs_exit_2_and_keep_files(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(photos / "nope", "--model", tiny_model, "--out", out) == 2
    assert "nope" in capsys.readouterr().err
    assert _run(photos, "--model", tiny_model, "--out", out, "--adapter", tmp_path) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert _run(photos, "--model", tiny_model, "--out", out, "--batch-size", 0) == 2
    out.mkdir()
    (out / "p2.npy").write_bytes(b"user data")
    assert _run(photos, "--model", tiny_model, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "p2.npy").read_bytes() == b"user data"
    assert not (out / "p0.npy").exists()  # refused before any work
    assert _run(photos, "--model", tiny_model, "--out", out, "--overwrite") == 0
    assert np.load(out / "p2.npy").shape == SIZES[2]
    assert not list(out.glob(".*"))  # no temporary files left
    (tmp_path / "notes.txt").write_text("x")
    assert _run(tmp_path / "notes.txt", "--model", tiny_model, "--out", out) == 2
