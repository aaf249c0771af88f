"""Round two (issue 21): faults and bad input that ended in a traceback, or in an error
that did not name the file or flag, are one line naming it, exit code 2.
docs/reliability.md, "Tracebacks" and "Unclear errors"."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.test_outputs import error_line, tree
from tests.trainer.helpers import make_dataset, make_tiny_dpt, train_config
from westar.cli import main
from westar.data import DataError, load_pairs


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--image-size", "56", "--batch-size", "2", "--no-progress", "--no-tensorboard",
            "--num-workers", "0", *extra]  # fmt: skip


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", n=2, size=(28, 28))


@pytest.fixture(scope="module")
def adapter(tiny_model, dataset_root, tmp_path_factory) -> Path:
    from westar.train import Trainer

    out = tmp_path_factory.mktemp("run") / "r"
    Trainer(train_config(tiny_model, dataset_root, out, steps=1, save_every=1)).fit()
    return out / "adapter"


def copy_adapter(adapter: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


# --------------------------------------------------------------------------- training


def test_image_broken_during_training_in_a_worker_is_one_line(
    tiny_model, data, tmp_path, monkeypatch, capsys
):
    from westar.train import Trainer

    original = Trainer.loader
    victim = data / "images" / "img_001.png"

    def break_then_load(self, start, end):  # after the dataset check, before the workers read
        victim.write_bytes(victim.read_bytes()[:60])
        return original(self, start, end)

    monkeypatch.setattr(Trainer, "loader", break_then_load)
    args = train_args(tiny_model, data, tmp_path / "o", "--steps", "2", "--num-workers", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    line = error_line(err)  # was a RuntimeError "Caught DataError in DataLoader worker ..."
    assert f"{victim}: cannot read image" in line and "worker" not in line


@pytest.mark.parametrize("fault", ["oserror", "torch"])
def test_disk_full_at_a_checkpoint_is_one_line(
    tiny_model, data, tmp_path, monkeypatch, fault, capsys
):
    import westar.training.checkpoints

    def full(*a, **k):
        if fault == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . unexpected pos; file write failed"
        )

    monkeypatch.setattr(westar.training.checkpoints, "save_file", full)
    out = tmp_path / "o"
    assert main(train_args(tiny_model, data, out, "--steps", "1")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{out / 'checkpoints' / 'step_00000001'}: cannot write" in line
    assert ("No space left" if fault == "oserror" else "file write failed") in line
    assert list((out / "checkpoints").iterdir()) == []  # no temporary folder left


def test_non_finite_loss_is_one_line_naming_lr(tiny_model, data, tmp_path, capsys):
    args = train_args(tiny_model, data, tmp_path / "o", "--steps", "4", "--lr", "1e30",
                      "--log-every", "1", "--save-every", "100")  # fmt: skip
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "non-finite loss at step" in line and "--lr" in line


def test_resume_with_another_lora_rank_is_one_line(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(tiny_model, data, out, "--steps", "2", "--save-every", "1")) == 0
    shutil.rmtree(out / "adapter")  # keep only the checkpoints (an interrupted run)
    shutil.rmtree(out / "teacher")
    args = train_args(tiny_model, data, out, "--steps", "3", "--resume", "--lora-rank", "4")
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "trained with --lora-rank 8, this run has 4" in line and "step_00000002" in line


@pytest.mark.parametrize(
    "config, field",
    [({"lr": "fast"}, "lr (--lr) must be a finite number"),
     ({"lora_rank": 1.5}, "lora_rank (--lora-rank) must be an integer"),
     ({"augment": "no"}, "augment (--augment) must be true or false"),
     ({"grid": "ab"}, "grid (--grid) must be a list of integers"),
     ({"lora_targets": [1]}, "lora_targets (--lora-targets) must be a list of strings or null"),
     ({"lr": 1e308, "weight_decay": float("inf")}, "number 1e999 is out of range")],
)  # fmt: skip
def test_config_with_wrong_types_is_one_line(tiny_model, data, tmp_path, config, field, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config).replace("Infinity", "1e999"))
    args = train_args(tiny_model, data, tmp_path / "o", "--config", str(path), "--steps", "1")
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert str(path) in line and field in line
    assert not (tmp_path / "o").exists()


def test_recipe_with_wrong_types_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    for text, field in (('{"lr": "fast"}', "lr (--lr) must be a finite number"),
                        ('{"steps": 1.5}', "steps (--steps) must be an integer"),
                        ('{"lr": 1e999}', "out of range")):  # fmt: skip
        recipe.write_text(text)
        for given in (text, str(recipe)):
            args = ["sweep", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--recipe", given]  # fmt: skip
            assert main(args) == 2
            assert field in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- adapters


def test_adapter_of_another_base_model_or_rank_is_one_line(
    tiny_model, adapter, data, tmp_path, capsys
):
    image = data / "images" / "img_000.png"
    dpt = make_tiny_dpt(tmp_path / "dpt")
    for model in (dpt, tiny_model):
        a = adapter
        if model == tiny_model:  # weights of rank 8 under a config saying rank 4
            a = copy_adapter(adapter, tmp_path)
            cfg = json.loads((a / "adapter_config.json").read_text())
            (a / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
        for cmd in (["predict", str(image), "--out", str(tmp_path / "p")],
                    ["eval", "--data", str(data), "--output", str(tmp_path / "e.json")],
                    ["merge", "--out", str(tmp_path / "m")]):  # fmt: skip
            assert main([*cmd, "--model", str(model), "--adapter", str(a)]) == 2
            line = error_line(capsys.readouterr().err)
            assert f"{a}: the adapter does not fit this model" in line, cmd
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("text", ["{broken", "[1]", '{"r": "eight"}'])
def test_broken_adapter_config_names_the_file(tiny_model, adapter, data, tmp_path, text, capsys):
    a = copy_adapter(adapter, tmp_path)
    (a / "adapter_config.json").write_text(text)
    image = data / "images" / "img_000.png"
    for cmd in (["predict", str(image), "--out", str(tmp_path / "p")],
                ["eval", "--data", str(data), "--output", str(tmp_path / "e.json")],
                ["merge", "--out", str(tmp_path / "m")]):  # fmt: skip
        assert main([*cmd, "--model", str(tiny_model), "--adapter", str(a)]) == 2
        assert f"{a / 'adapter_config.json'}: " in error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- pairs files


@pytest.mark.parametrize(
    "text, reason",
    [('{"images": {"img_000": {"width": 1e999, "height": 28, "pairs": []}}}', "out of range"),
     ('{"images": {"img_000": {"width": Infinity, "height": 28}}}', "Infinity is not a JSON"),
     ('{"images": {"img_000": {"width": NaN, "height": 28}}}', "NaN is not a JSON"),
     ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
     (b'{"source": "caf\xe9", "images": {}}', "not UTF-8")],
)  # fmt: skip
def test_bad_pairs_json_names_the_file(tiny_model, data, tmp_path, text, reason, capsys):
    pairs = data / "pairs.json"
    pairs.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=reason):
        load_pairs(pairs)
    assert main(train_args(tiny_model, data, tmp_path / "o", "--steps", "1")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{pairs}: pairs file" in line and reason in line


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "args, message",
    [(["annotate", "--images", "IMAGES", "--out", "OUT/p.json", "--seed", "-1"], "--seed must be >= 0, got -1"),
     (["pairs", "--data", "DATA", "--out", "OUT/p.json", "--seed", "-1"], "--seed must be >= 0, got -1"),
     (["train", "--data", "DATA", "--output-dir", "OUT/o", "--seed", "-1"], "seed (--seed) must be >= 0"),
     (["masks", "--data", "DATA", "--out", "OUT/m", "--method", "slic", "--n-segments", "-5"], "--n-segments must be positive, got -5"),
     (["masks", "--data", "DATA", "--out", "OUT/m", "--scale", "0"], "--scale must be positive"),
     (["masks", "--data", "DATA", "--out", "OUT/m", "--sigma", "-1"], "--sigma must be >= 0")],
)  # fmt: skip
def test_out_of_range_flags_are_one_line(data, tmp_path, args, message, capsys):
    subs = {"DATA": str(data), "IMAGES": str(data / "images")}
    args = [subs.get(a, a.replace("OUT", str(tmp_path))) for a in args]
    before = tree(tmp_path)
    assert main(args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before  # nothing written


# --------------------------------------------------------------------------- disk full


def test_disk_full_in_predict_names_the_file(tiny_model, data, tmp_path, monkeypatch, capsys):
    def full(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "p"
    args = ["predict", str(data / "images"), "--model", str(tiny_model), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{out / 'img_000.npy'}: cannot write (No space left on device)" in line
    assert sorted(p.name for p in out.iterdir()) == []  # no temporary or partial file


def test_disk_full_in_merge_names_the_output(tiny_model, adapter, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{out}: cannot write the merged model (No space left on device)" in line
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
