"""`westar bench --quick` end to end (the CI version of the benchmark), reuse of built
folders, a changed definition, split separation on disk, and bad arguments."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from westar.bench import build, split_dir
from westar.bench import frozen as D
from westar.bench.score import hurts
from westar.cli import main


def _run(*args: str) -> int:
    return main(["bench", *args, "--no-progress", "--device", "cpu"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert _run("--quick", "--data", str(out / "data"), "--out", str(out)) == 0
    return out


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def test_quick_bench_writes_everything(quick):
    manifest = json.loads((quick / "data" / "manifest.json").read_text())
    assert manifest["definition"]["quick"] is True
    assert len(manifest["splits"]) == len(D.QUICK_DOMAINS) * len(D.QUICK_SEEDS) * 3
    report = json.loads((quick / "bench.json").read_text())
    assert list(report["domains"]) == list(D.QUICK_DOMAINS)
    for domain, r in report["domains"].items():
        assert r["per_seed"]["0"]["images"] == D.QUICK_SIZES["test"]
        for key in ("abs_rel", "delta1"):
            assert math.isfinite(r[key]["mean"]) and r[key]["std"] == 0.0
        if domain != "clean":
            assert math.isfinite(r["abs_rel_ratio"]["mean"])
            assert r["hurts"] == hurts(r["abs_rel_ratio"]["mean"], r["delta1_drop_points"]["mean"])
    md = (quick / "bench.md").read_text()
    assert "westar bench --data" in md and "--quick" in md
    assert all(f"| {d} |" in md for d in D.QUICK_DOMAINS)
    for name in [*D.QUICK_DOMAINS, "bars"]:
        with Image.open(quick / "figures" / f"{name}.png") as im:
            assert im.size[0] > 100 and im.size[1] > 100
    # the train split is what the trainer reads, plus depth/ for an oracle
    train = split_dir(quick / "data", "fog", 0, "train")
    assert {p.name for p in train.iterdir()} == {
        "images", "instances", "depth", "pairs.json", "split.json", "files.json"
    }  # fmt: skip
    pairs = json.loads((train / "pairs.json").read_text())
    assert len(pairs["images"]) == D.QUICK_SIZES["train"]
    assert all(len(v["pairs"]) == 3 * D.PAIR_SAMPLES for v in pairs["images"].values())
    assert not (split_dir(quick / "data", "fog", 0, "test") / "instances").exists()
    from westar.data import AdaptationDataset  # the trainer's reader (it ignores depth/)

    ds = AdaptationDataset(
        train / "images", (D.SIZE, D.SIZE), train / "instances", train / "pairs.json"
    )
    assert len(ds) == D.QUICK_SIZES["train"] and len(ds[0]["labels"]) == 3 * D.PAIR_SAMPLES


def test_splits_never_share_an_image(quick):
    """Byte hashes: no image (nor depth map) of one split of a seed is in another split,
    in any domain; corruption domains are the clean scenes, corrupted."""
    owner: dict[str, str] = {}
    for domain in D.QUICK_DOMAINS:
        for split in D.SPLITS:
            folder = split_dir(quick / "data", domain, 0, split)
            for p in sorted((folder / "images").iterdir()) + sorted((folder / "depth").iterdir()):
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                where = owner.setdefault(h, f"{domain}/{split}/{p.name}")
                # equal bytes only for the same scene's depth in two rooms domains
                assert where.split("/")[1:] == [split, p.name], (where, domain, split, p.name)
    clean = split_dir(quick / "data", "clean", 0, "test")
    fog = split_dir(quick / "data", "fog", 0, "test")
    assert sorted(p.name for p in (clean / "images").iterdir()) == sorted(
        p.name for p in (fog / "images").iterdir()
    )
    stem = sorted((clean / "depth").iterdir())[0].name
    assert np.array_equal(np.load(clean / "depth" / stem), np.load(fog / "depth" / stem))


def test_second_run_reuses_the_built_folders(quick, capsys):
    data = quick / "data"
    before = {d: _files(data / d) for d in D.QUICK_DOMAINS}
    assert _run("--quick", "--data", str(data), "--out", str(quick)) == 0
    assert {d: _files(data / d) for d in D.QUICK_DOMAINS} == before


def test_changed_definition_is_refused_without_overwrite(quick, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(quick / "data", data)
    monkeypatch.setitem(D.SEVERITIES, "fog", 2)
    capsys.readouterr()
    assert _run("--quick", "--data", str(data), "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite" in err
    assert str(split_dir(data, "fog", 0, "train")) in err
    assert not (tmp_path / "bench.json").exists()  # refused before any work
    untouched = _files(data / "clean")
    assert _run("--quick", "--data", str(data), "--out", str(tmp_path), "--overwrite") == 0
    fog = json.loads((split_dir(data, "fog", 0, "test") / "split.json").read_text())
    assert fog["severity"] == 2
    assert _files(data / "clean") == untouched  # only the changed domain was rebuilt
    assert json.loads((tmp_path / "bench.json").read_text())["domains"]["fog"]["severity"] == 2


def test_build_refuses_an_incomplete_folder(tmp_path):
    folder = split_dir(tmp_path, "clean", 0, "val")
    (folder / "images").mkdir(parents=True)  # no split.json: not a complete build
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(tmp_path, seeds=[0], domains=["clean"], quick=True, progress=False)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--seeds", "7"], "--seeds"),
        (["--seeds", "one"], "--seeds"),
        (["--domains", "clean", "snow"], "--domains"),
        (["--num-workers", "0"], "--num-workers"),
        (["--model", "{tmp}/no-model"], "--model"),
        (["--data", "{tmp}/file"], "--data"),
        (["--out", "{tmp}/file"], "--out"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, named):
    (tmp_path / "file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["--quick", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    rc = _run(*base, *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and named in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
