"""Corruption suite: determinism, severity ordering, depth-aware fog, folder round trip."""

import argparse

import numpy as np
import pytest
from PIL import Image

from westar.corrupt import (
    CORRUPTIONS,
    add_corrupt_arguments,
    corrupt_folder,
    corrupt_image,
    run_corrupt,
)
from westar.synth import SceneParams, render_scene, write_dataset

SMALL = SceneParams(height=70, width=70)


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(s, SMALL) for s in (1, 2)]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_severity_grows_and_is_deterministic(name, scenes):
    diffs = np.zeros(5)
    for s in scenes:
        for sev in range(1, 6):
            out = corrupt_image(s.image, name, sev, seed=3, depth=s.depth)
            assert out.shape == s.image.shape and out.dtype == np.uint8
            np.testing.assert_array_equal(
                out, corrupt_image(s.image, name, sev, seed=3, depth=s.depth)
            )
            diffs[sev - 1] += np.abs(out.astype(np.float64) - s.image).mean()
    assert diffs[0] > 0
    assert diffs[4] > 1.3 * diffs[0], diffs
    assert (diffs[1:] >= 0.9 * diffs[:-1]).all(), diffs  # monotone up to noise


@pytest.mark.parametrize("name", ["gaussian_noise", "rain", "motion_blur"])
def test_seed_changes_random_corruptions(name, scenes):
    img = scenes[0].image
    assert not np.array_equal(
        corrupt_image(img, name, 3, seed=0), corrupt_image(img, name, 3, seed=1)
    )


def test_fog_is_depth_dependent(scenes):
    s = scenes[0]
    out = corrupt_image(s.image, "fog", 3, seed=0, depth=s.depth)
    diff = np.abs(out.astype(np.float64) - s.image).mean(axis=2)
    near = s.depth <= np.quantile(s.depth, 0.25)
    far = s.depth >= np.quantile(s.depth, 0.75)
    assert diff[far].mean() > diff[near].mean()
    # fallback without depth still fogs the image
    out2 = corrupt_image(s.image, "fog", 3, seed=0)
    assert np.abs(out2.astype(np.float64) - s.image).mean() > 5


def test_bad_arguments(scenes):
    img = scenes[0].image
    with pytest.raises(ValueError):
        corrupt_image(img, "fog", 0)
    with pytest.raises(ValueError):
        corrupt_image(img, "fog", 6)
    with pytest.raises(ValueError):
        corrupt_image(img, "snow_storm", 3)
    with pytest.raises(ValueError):
        corrupt_image(img.astype(np.float32), "jpeg", 3)


def test_corrupt_dataset_folder(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    stems = write_dataset(src, 3, seed=5, params=SMALL)
    summary = corrupt_folder(src, dst, "fog", 4, seed=1)
    assert summary["n_images"] == 3 and summary["depth_used"]
    assert (dst / "corruption.json").exists()
    for stem in stems:
        a = np.asarray(Image.open(src / "images" / f"{stem}.png"))
        b = np.asarray(Image.open(dst / "images" / f"{stem}.png"))
        assert a.shape == b.shape and not np.array_equal(a, b)
        # labels travel unchanged
        np.testing.assert_array_equal(
            np.load(src / "depth" / f"{stem}.npy"), np.load(dst / "depth" / f"{stem}.npy")
        )
        np.testing.assert_array_equal(
            np.asarray(Image.open(src / "instances" / f"{stem}.png")),
            np.asarray(Image.open(dst / "instances" / f"{stem}.png")),
        )
    # same seed, same result
    corrupt_folder(src, tmp_path / "dst2", "fog", 4, seed=1)
    for stem in stems:
        np.testing.assert_array_equal(
            np.asarray(Image.open(dst / "images" / f"{stem}.png")),
            np.asarray(Image.open(tmp_path / "dst2" / "images" / f"{stem}.png")),
        )


def test_corrupt_plain_folder_mixed_and_cli(tmp_path):
    src = tmp_path / "plain"
    src.mkdir()
    for k in range(4):
        Image.fromarray(render_scene(k, SMALL).image).save(src / f"img{k}.jpg", quality=95)
    parser = add_corrupt_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(src), str(tmp_path / "out"), "-c", "mixed", "-s", "2"])
    assert run_corrupt(args) == 0
    outs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert outs == [f"img{k}.png" for k in range(4)]
    with pytest.raises(SystemExit):
        parser.parse_args([str(src), "x", "--severity", "7"])


def test_westar_corrupt_command(tmp_path, capsys):
    cli = pytest.importorskip("westar.cli")
    src = tmp_path / "data"
    write_dataset(src, 2, seed=0, params=SMALL)
    assert cli.main(["corrupt", str(src), str(tmp_path / "out"), "-c", "rain", "-s", "5"]) == 0
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2
    assert cli.main(["corrupt", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
