"""Issue 12, point 7: pairs skip images without depth, one name for the image size,
normalization errors are not swallowed, the package docstring lists the real commands."""

from __future__ import annotations

import json
import shutil

import pytest

from westar.cli import all_commands, build_parser, main


def test_pairs_skip_images_without_depth(dataset_root, tmp_path, capsys):
    from westar.data import load_pairs

    root = tmp_path / "ds"
    shutil.copytree(dataset_root, root)
    (root / "pairs.json").unlink()
    for stem in ("img_001", "img_004"):
        (root / "depth" / f"{stem}.npy").unlink()
    assert main(["pairs", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "for 4 images" in out and "skipped 2 images without a depth map" in out
    assert "img_001.png" in out and "img_004.png" in out
    pairs = load_pairs(root / "pairs.json")
    assert sorted(pairs) == ["img_000", "img_002", "img_003", "img_005"]
    assert all(entry["pairs"] for entry in pairs.values())
    # a broken depth file is still an error naming it (not a silent skip)
    (root / "depth" / "img_002.npy").write_bytes(b"junk")
    assert main(["pairs", "--data", str(root), "--out", str(tmp_path / "p.json")]) == 2
    assert "img_002.npy" in capsys.readouterr().err
    for f in (root / "depth").iterdir():
        f.unlink()
    assert main(["pairs", "--data", str(root), "--out", str(tmp_path / "p.json")]) == 2
    assert "no depth map" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_one_name_for_the_image_size():
    parser = build_parser()
    train = parser.parse_args(["train", "--image-size", "518", "700"])
    assert train.image_size == [518, 700]
    for flag in ("--image-size", "--size"):  # eval: the shared name, the old one still works
        args = parser.parse_args(["eval", "--model", "m", flag, "392"])
        assert args.size == 392
    predict = parser.parse_args(["predict", "x", "--model", "m", "--out", "o", "--image-size", "7"])
    assert predict.image_size == 7
    help_text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--image-size" in help_text


def _model_dir(tiny_model, tmp_path, preprocessor):
    path = tmp_path / "m"
    shutil.copytree(tiny_model, path)
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(preprocessor)
    return path


def test_normalization_is_read_or_refused(tiny_model, tmp_path, monkeypatch):
    from westar.model import IMAGENET_MEAN, load_depth_model

    good = json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]})
    dm = load_depth_model(str(_model_dir(tiny_model, tmp_path / "a", good)))
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.5, 1.0)
    dm = load_depth_model(str(_model_dir(tiny_model, tmp_path / "b", None)))
    assert dm.mean == IMAGENET_MEAN
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_depth_model(str(_model_dir(tiny_model, tmp_path / "c", "{not json")))
    bad = json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="image_mean / image_std"):
        load_depth_model(str(_model_dir(tiny_model, tmp_path / "d", bad)))

    # a hub id: a missing processor config falls back, any other failure is raised
    import transformers

    from westar.model import _read_normalization

    def missing(*a, **k):
        raise OSError("no preprocessor_config.json")

    def broken(*a, **k):
        raise RuntimeError("bug in a processor")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", missing)
    assert _read_normalization("org/model", True) == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="bug in a processor"):
        _read_normalization("org/model", True)


def test_package_docstring_lists_the_commands():
    import westar

    listed = westar.__doc__.split("westar {", 1)[1].split("}", 1)[0]
    assert sorted(c.strip() for c in listed.replace("\n", " ").split(",")) == sorted(all_commands())
    for name in westar.__all__:
        assert getattr(westar, name) is not None


def test_readme_install_brings_the_build_requirements():
    """The README's first command installs pyproject's build requirements before the
    --no-build-isolation build (a fresh Python 3.12+ venv has no setuptools); CI runs
    the command itself in such a venv (scripts/check_readme_install.sh)."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1]
    line = next(ln for ln in quick.splitlines() if ln.startswith("pip install"))
    first, build = line.split(" && ")[:2]
    assert "--no-build-isolation" in build and "--no-build-isolation" not in first
    installed = {re.split(r"[=<>\[]", w)[0].lower() for w in first.split()[2:]}
    requires = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    needed = {re.split(r"[=<>\[ ]", r)[0].lower() for r in requires} | {"torch"}
    assert needed <= installed, needed - installed
    script = (root / "scripts" / "check_readme_install.sh").read_text()
    assert "README.md" in script and "uninstall" in script
    assert "check_readme_install.sh" in (root / ".ci" / "run").read_text()
