"""`westar merge` and `westar corrupt` never destroy data (cases of docs/reliability.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.trainer.helpers import make_dataset, train_config
from westar.cli import main


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def adapter(tiny_model, dataset_root, tmp_path_factory) -> Path:
    from westar.train import Trainer

    out = tmp_path_factory.mktemp("run") / "r"
    Trainer(train_config(tiny_model, dataset_root, out, steps=1, save_every=1)).fit()
    return out / "adapter"


# --------------------------------------------------------------------------- merge


def test_merge_refuses_non_empty_out_without_overwrite(tiny_model, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("my other model")
    (out / "notes.txt").write_text("keep me")
    before = tree(out)
    args = ["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 2
    assert "not empty; pass --overwrite" in error_line(capsys.readouterr().err)
    assert tree(out) == before
    assert main(args + ["--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary folder was renamed into place


def test_merge_never_writes_into_the_base_model(tiny_model, adapter, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    before = tree(base)
    for out in (base, base / "merged"):
        for extra in ([], ["--overwrite"]):
            args = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]
            assert main(args + extra) == 2
            assert "would overwrite the base model" in error_line(capsys.readouterr().err)
    assert tree(base) == before


def test_merge_failure_leaves_old_output(tiny_model, adapter, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 0
    before = tree(out)

    def disk_full(self, *a, **k):
        Path(a[0], "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(a[0]))

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    assert main(args + ["--overwrite"]) == 2
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert tree(out) == before and not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- corrupt


@pytest.fixture
def small_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "src", n=3, size=(28, 28), pairs=False)


def test_corrupt_refuses_non_empty_destination(small_data, tmp_path, capsys):
    dst = make_dataset(tmp_path / "clean", n=2, size=(28, 28), pairs=False)
    before = tree(dst)
    args = ["corrupt", str(small_data), str(dst), "-c", "contrast"]
    assert main(args) == 2
    assert "not empty; pass --overwrite" in error_line(capsys.readouterr().err)
    assert tree(dst) == before
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.stem for p in (dst / "images").iterdir()) == ["img_000", "img_001", "img_002"]


def test_corrupt_bad_image_leaves_no_partial_output(small_data, tmp_path, capsys):
    bad = small_data / "images" / "img_001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    dst = tmp_path / "out"
    assert main(["corrupt", str(small_data), str(dst)]) == 2
    assert f"{bad}: cannot read image" in error_line(capsys.readouterr().err)
    assert not dst.exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.warns(UserWarning, match="skipping img_001.png"):
        assert main(["corrupt", str(small_data), str(dst), "--skip-bad"]) == 0
    assert sorted(p.stem for p in (dst / "images").iterdir()) == ["img_000", "img_002"]
    assert "skipped 1 bad image" in capsys.readouterr().out


def test_corrupt_never_writes_through_links(small_data, tmp_path):
    outside = tmp_path / "precious.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(outside)
    before = outside.read_bytes()
    dst = tmp_path / "out"
    (dst / "images").mkdir(parents=True)
    (dst / "images" / "img_000.png").symlink_to(outside)  # a link in the old output
    assert main(["corrupt", str(small_data), str(dst), "--overwrite"]) == 0
    assert outside.read_bytes() == before
    assert not (dst / "images" / "img_000.png").is_symlink()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert main(["corrupt", str(small_data), str(link), "--overwrite"]) == 2


def test_corrupt_message_names_the_corruption(small_data, tmp_path, capsys):
    assert main(["corrupt", str(small_data), str(tmp_path / "c"), "-c", "contrast"]) == 0
    out = capsys.readouterr().out
    assert "contrast severity 3" in out and "fog" not in out
    assert main(["corrupt", str(small_data), str(tmp_path / "f"), "-c", "fog"]) == 0
    assert "fog from depth maps for 3 images" in capsys.readouterr().out
