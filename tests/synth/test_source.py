"""The shipped source model loads offline and predicts finite disparity maps."""

import os

import numpy as np
import pytest
import torch

from westar.synth import load_source_model, render_scene, source_model_path


def test_source_model_is_small_and_shipped():
    path = source_model_path()
    assert (path / "config.json").exists()
    weights = path / "model.safetensors"
    assert weights.exists() and weights.stat().st_size < 16 * 2**20


@pytest.mark.parametrize("size", [126, 112])
def test_source_model_loads_offline_and_predicts(monkeypatch, size):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, path = load_source_model()
    assert os.fspath(path).endswith(os.path.join("assets", "source_model"))
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    from westar.synth import SceneParams

    imgs = np.stack([render_scene(s, SceneParams(height=size, width=size)).image for s in (0, 1)])
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        out = model(pixel_values=x).predicted_depth
    assert out.shape == (2, size, size)
    assert torch.isfinite(out).all()
    assert out.std() > 0


def test_every_asset_is_packaged():
    """pyproject's package-data patterns match every file under westar/assets, so a
    regular (non-editable) install ships the source model (`assets/*` alone did not
    descend into assets/source_model/, and `westar demo` failed after `pip install .`)."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["westar"]
    package = root / "westar"
    assets = [p for p in (package / "assets").rglob("*") if p.is_file()]
    assert assets, "no assets found"
    for path in assets:
        rel = path.relative_to(package).as_posix()
        # setuptools' glob: '*' does not cross '/'
        assert any(
            fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns
        ), f"{rel} is not matched by package-data {patterns}"
