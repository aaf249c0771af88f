"""Bad input is named in one line before long work; nothing is silently wrong.

Cases of docs/reliability.md (silently wrong results, clear and early errors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.trainer.helpers import make_dataset, train_config
from westar.cli import main
from westar.data import AdaptationDataset, DataError, image_size, load_pairs, read_image

ROOT = Path(__file__).resolve().parents[2]


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", n=3, size=(28, 28))


def build(root: Path, **kw) -> AdaptationDataset:
    return AdaptationDataset(
        root / "images", (28, 28), root / "instances", root / "pairs.json", **kw
    )


# --------------------------------------------------------------------------- silently wrong


def test_16_bit_image_is_scaled_not_clipped(data, tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, size=(28, 28), dtype=np.uint16)
    path = data / "images" / "img_001.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    want = np.round(values / 257.0).astype(np.uint8)
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (28, 28, 3)
    assert all(np.array_equal(rgb[..., c], want) for c in range(3))
    item = build(data)[1]  # what training sees, resized to the same 28x28
    np.testing.assert_allclose(item["image"][0].numpy(), want / 255.0, atol=1e-6)
    # corrupt reads it the same way: contrast keeps the mean, so not all white
    from westar.corrupt import corrupt_folder

    corrupt_folder(data, tmp_path / "c", "contrast", 1)
    out = np.asarray(Image.open(tmp_path / "c" / "images" / "img_001.png"))
    assert abs(out.mean() - want.mean()) < 2


@pytest.mark.parametrize("point", [[True, 3], [3, False], [1.5, 3]])
def test_pair_point_must_be_integer_pixels(data, point):
    doc = json.loads((data / "pairs.json").read_text())
    doc["images"]["img_002"]["pairs"][0]["a"] = point
    (data / "pairs.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"img_002.*pairs\[0\]\.a must be \[x, y\] in integer"):
        load_pairs(data / "pairs.json")


def test_pair_point_other_forms(data):
    """Guard: integral floats still load; strings and null were refused before too."""
    doc = json.loads((data / "pairs.json").read_text())
    doc["images"]["img_002"]["pairs"][0]["a"] = [3.0, 4.0]
    (data / "pairs.json").write_text(json.dumps(doc))
    assert load_pairs(data / "pairs.json")["img_002"]["pairs"][0]["a"] == [3.0, 4.0]
    for point in ([2, "3"], [2, None], [2], "2,3"):
        doc["images"]["img_002"]["pairs"][0]["a"] = point
        (data / "pairs.json").write_text(json.dumps(doc))
        with pytest.raises(DataError, match=r"pairs\[0\]\.a must be \[x, y\]"):
            load_pairs(data / "pairs.json")


@pytest.mark.parametrize("size", ["0", "-14"])
def test_eval_size_must_be_positive(tiny_model, data, size, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(tiny_model), "--data", str(data), "--size", size])
    assert exit_.value.code == 2
    assert f"--size: must be a positive integer, got {size}" in capsys.readouterr().err
    from westar.evaluate import evaluate

    with pytest.raises(ValueError, match="--size must be a positive"):
        evaluate(str(tiny_model), data / "images", data / "depth", size=int(size))


def test_train_grid_must_be_positive(tiny_model, data, tmp_path, capsys):
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--hdn", "grid",
            "--output-dir", str(tmp_path / "o"), "--grid", "4", "0"]  # fmt: skip
    assert main(args) == 2
    assert "grid levels must be >= 1" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_pairs_says_when_depth_is_all_invalid(data, capsys):
    np.save(data / "depth" / "img_001.npy", np.zeros((28, 28), np.float32))
    with pytest.warns(UserWarning, match=r"img_001\.npy: fewer than 2 valid depth pixels"):
        assert main(["pairs", "--data", str(data), "--overwrite"]) == 0
    assert "1 image without valid depth got no pairs" in capsys.readouterr().out


# --------------------------------------------------------------------------- early errors


def test_truncated_jpeg_is_found_before_training(data):
    jpg = data / "images" / "img_001.jpg"
    Image.open(data / "images" / "img_001.png").save(jpg, quality=90)
    (data / "images" / "img_001.png").unlink()
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size * 9 // 10])
    assert image_size(jpg) == (28, 28)  # the header is intact: only decoding finds it
    with pytest.raises(DataError, match=r"img_001\.jpg: cannot read image"):
        build(data)
    with pytest.warns(UserWarning, match="img_001"):
        assert len(build(data, skip_bad=True)) == 2


@pytest.mark.parametrize(
    "kind, message",
    [
        ("negative", r"ids must lie in \[0, 2\*\*31 - 1\]"),
        ("float", "must hold integers"),
        ("too_large", r"ids must lie in \[0, 2\*\*31 - 1\]"),
        ("rgb", "must be 8- or 16-bit grayscale"),
    ],
)
def test_bad_instance_map_is_found_before_training(data, kind, message):
    ids = np.ones((28, 28), np.int64)
    folder = data / "instances"
    (folder / "img_002.png").unlink()
    if kind == "negative":
        np.save(folder / "img_002.npy", -ids)
    elif kind == "float":
        np.save(folder / "img_002.npy", ids.astype(np.float32))
    elif kind == "too_large":
        np.save(folder / "img_002.npy", ids * 2**31)
    else:
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "img_002.png")
    with pytest.raises(DataError, match=rf"img_002\.(npy|png).*{message}"):
        build(data)


@pytest.mark.parametrize(
    "error, shown",
    [
        (PermissionError(13, "Permission denied", "/data/run/metrics.csv"),
         "/data/run/metrics.csv: Permission denied"),
        (IsADirectoryError(21, "Is a directory", "/data/eval.json"),
         "/data/eval.json: Is a directory"),
        (OSError(28, "No space left on device", "/data/run"), "/data/run: No space left on device"),
    ],
)  # fmt: skip
def test_cli_turns_os_errors_into_one_line(monkeypatch, capsys, error, shown):
    import westar.evaluate

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(westar.evaluate, "evaluate", fail)
    assert main(["eval", "--model", "m", "--images", "i", "--depth", "d"]) == 2
    assert error_line(capsys.readouterr().err) == f"westar eval: error: {shown}"


def test_eval_output_folder_is_refused_before_evaluation(tiny_model, data, monkeypatch, capsys):
    import westar.evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(westar.evaluate, "load_depth_model", no_model)
    folder = data / "reports"
    folder.mkdir()
    args = ["eval", "--model", str(tiny_model), "--data", str(data), "--output", str(folder)]
    assert main(args) == 2
    assert f"{folder}: --out is a folder" in error_line(capsys.readouterr().err)
    blocker = data / "a_file"
    blocker.write_text("")
    assert main(args[:-1] + [str(blocker / "eval.json")]) == 2
    assert f"{blocker}: Not a directory" in error_line(capsys.readouterr().err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_is_one_line(tiny_model, data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        args = ["eval", "--model", str(tiny_model), "--data", str(data),
                "--output", str(locked / "eval.json")]  # fmt: skip
        assert main(args) == 2
        assert f"{locked}: Permission denied" in error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_model_weights_are_one_line(tiny_model, data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _truncate(model / "model.safetensors")
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(model), "--data", str(data), "--output", str(out)]) == 2
    assert f"{model}: unreadable model weights" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_truncated_adapter_weights_are_one_line(tiny_model, dataset_root, tmp_path, capsys):
    from westar.train import Trainer

    run = tmp_path / "run"
    Trainer(train_config(tiny_model, dataset_root, run, steps=1, save_every=1)).fit()
    _truncate(run / "adapter" / "adapter_model.safetensors")
    args = ["eval", "--model", str(tiny_model), "--data", str(dataset_root), "--adapter",
            str(run / "adapter"), "--size", "28", "--output", str(tmp_path / "e.json")]  # fmt: skip
    assert main(args) == 2
    assert f"{run / 'adapter'}: unreadable adapter weights" in error_line(capsys.readouterr().err)
    merge = ["merge", "--model", str(tiny_model), "--adapter", str(run / "adapter"),
             "--out", str(tmp_path / "m")]  # fmt: skip
    assert main(merge) == 2
    assert f"{run / 'adapter'}: unreadable adapter weights" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def test_misspelled_hub_model_fails_at_once_without_hub(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    name = "depth-anything/Depth-Anythng-V2-Small-hf"
    start = time.monotonic()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "westar", "eval", "--model", name, "--data", str(data),
             "--output", str(tmp_path / "e.json")],
            capture_output=True, text=True, env=env, timeout=25,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("an unreachable hub was retried for more than 25 s")
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{name}: cannot load the model" in error_line(res.stderr)
    assert "hub is not reachable" in res.stderr
    assert time.monotonic() - start < 25


def test_bad_config_json_names_the_file(tiny_model, data, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"lr": 0.001,}')
    assert main(["train", "--config", str(config), "--data", str(data)]) == 2
    assert f"{config}: --config is not valid JSON" in error_line(capsys.readouterr().err)
    config.write_text("[1, 2]")
    assert main(["train", "--config", str(config), "--data", str(data)]) == 2
    assert f"{config}: --config must hold a JSON object" in error_line(capsys.readouterr().err)
