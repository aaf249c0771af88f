"""Resume never unpickles, survives broken checkpoints, and one run owns its folder.

Cases of docs/reliability.md (security, the run lock, resume).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.helpers import train_config
from westar.cli import main
from westar.train import Trainer, find_latest_checkpoint
from westar.training.metrics import CSV_FIELDS

ROOT = Path(__file__).resolve().parents[2]
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


class Payload:
    """Unpickling this creates `marker` (stands for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def error_line(err: str) -> str:
    """The CLI's one error line (progress bars of model loading may precede it)."""
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if "lora_" in n}


def train_cli(tiny_model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out),
            "--image-size", "56", "--steps", "2", "--batch-size", "2", "--save-every", "1",
            "--no-progress", "--no-tensorboard", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_model, dataset_root, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that edit it)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    trainer = Trainer(train_config(tiny_model, dataset_root, out))
    trainer.fit()
    return out, lora_state(trainer)


def copy_run(finished_run, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


# --------------------------------------------------------------------------- security


def test_resume_refuses_planted_pickle(tiny_model, dataset_root, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    planted = [p for p in out.joinpath("checkpoints").rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert planted  # accelerate's optimizer/scheduler state
    for p in planted:
        torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, p)
    trainer = Trainer(train_config(tiny_model, dataset_root, out, steps=6, resume="auto"))
    with pytest.raises(ValueError, match=r"refused to load.*pickled objects"):
        trainer.fit()
    assert not marker.exists()
    # the same through the CLI: one line naming the file, exit code 2
    assert main(train_cli(tiny_model, dataset_root, out, "--steps", "6", "--resume")) == 2
    err = error_line(capsys.readouterr().err)
    assert "refused to load" in err and str(out) in err
    assert not marker.exists()


def test_rng_state_is_stored_without_pickle(finished_run):
    from safetensors.torch import load_file

    from westar.checkpoint import rng_tensors, set_rng_from_tensors

    ckpt = find_latest_checkpoint(finished_run[0])
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".pth", ".pkl")]
    state = load_file(str(ckpt / "rng_rank0.safetensors"))  # plain tensors
    assert {"torch", "numpy.keys", "python.state"} <= set(state)
    # a round trip through the tensors restores all three generators exactly
    random.gauss(0, 1)  # a cached Gaussian in Python's state too
    np.random.normal()
    saved = rng_tensors()
    want = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    set_rng_from_tensors(saved)
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2:] == got[2:]


# --------------------------------------------------------------------------- lock


def test_second_run_into_same_folder_is_refused(tiny_model, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    hold = (
        "import sys, time; from westar.checkpoint import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"
    )  # takes the folder's lock as a running `westar train` does, and keeps it
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    other = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        assert main(train_cli(tiny_model, dataset_root, out)) == 2
    finally:
        other.kill()
        other.wait()
    err = error_line(capsys.readouterr().err)
    assert f"another westar train (pid {other.pid})" in err and str(out) in err
    assert not (out / "metrics.csv").exists() and not (out / "checkpoints").exists()
    # once that process is gone (killed: it could not clean up), the folder is free again
    assert main(train_cli(tiny_model, dataset_root, out)) == 0
    assert not (out / ".westar.lock").exists()


def test_stale_lock_is_taken_over_and_released(tiny_model, dataset_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    (out / ".westar.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    assert main(train_cli(tiny_model, dataset_root, out)) == 0
    assert (out / "adapter").is_dir() and not (out / ".westar.lock").exists()


def test_pid_lock_without_flock(tmp_path):
    """Where fcntl is missing the pid in the file decides (live: refused, dead: taken)."""
    from westar.checkpoint import RunLock, RunLockedError

    me = f"{os.getpid()} {os.uname().nodename}\n".encode()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / RunLock.NAME).write_text(f"{live.pid} {os.uname().nodename}\n")
        with pytest.raises(RunLockedError, match=f"pid {live.pid}"):
            RunLock(tmp_path)._acquire_by_pid(me)
    finally:
        live.kill()
        live.wait()
    lock = RunLock(tmp_path)._acquire_by_pid(me)  # its process is gone: stale
    assert (tmp_path / RunLock.NAME).read_bytes() == me
    lock.release()
    assert not (tmp_path / RunLock.NAME).exists()


# --------------------------------------------------------------------------- resume


def test_resume_falls_back_past_truncated_checkpoint(
    tiny_model, dataset_root, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path)
    latest = find_latest_checkpoint(out)
    assert latest.name == "step_00000004"
    for weights in latest.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (out / "adapter").rename(out / "adapter.old")
    cfg = train_config(tiny_model, dataset_root, out, resume="auto")
    resumed = Trainer(cfg)
    with pytest.warns(UserWarning, match=r"skipping broken checkpoint.*step_00000004"):
        resumed.fit()
    assert resumed.step == 4
    straight = finished_run[1]
    got = lora_state(resumed)
    assert all(torch.equal(got[n], straight[n]) for n in straight)  # resumed from step 2


def test_explicit_truncated_checkpoint_is_one_line(
    tiny_model, dataset_root, finished_run, tmp_path, capsys
):
    out = copy_run(finished_run, tmp_path)
    teacher = find_latest_checkpoint(out) / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:100])
    ckpt = str(teacher.parent)
    assert main(train_cli(tiny_model, dataset_root, out, "--steps", "6", "--resume", ckpt)) == 2
    assert str(teacher) in error_line(capsys.readouterr().err)


def test_stray_empty_step_folder_does_not_block_resume(
    tiny_model, dataset_root, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "step_00000009").mkdir()  # e.g. made by hand or a copy tool
    trainer = Trainer(train_config(tiny_model, dataset_root, out, steps=6, resume="auto"))
    trainer.fit()
    assert trainer.step == 6


def test_relative_output_dir_resumes_without_config_warning(
    tiny_model, dataset_root, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    Trainer(train_config(tiny_model, dataset_root, out)).fit(stop_after=2)
    monkeypatch.chdir(tmp_path)  # the same folders, now given relative to the cwd
    rel_data = os.path.relpath(dataset_root, tmp_path)
    cfg = train_config(tiny_model, rel_data, "run", resume="auto")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming.*different configuration")
        trainer = Trainer(cfg)
        trainer.fit()
    assert trainer.step == 4 and (out / "checkpoints" / "step_00000004").is_dir()
    with pytest.warns(UserWarning, match=r"different configuration for \['lr'\]"):
        Trainer(train_config(tiny_model, rel_data, "run", lr=0.5, steps=6, resume="auto")).fit()


def test_broken_metrics_rows_do_not_survive_resume(
    tiny_model, dataset_root, finished_run, tmp_path
):
    out = copy_run(finished_run, tmp_path)
    metrics = out / "metrics.csv"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a row cut short, as by a crash or a 2nd writer
    too_long = ",".join(["2"] + ["0.1"] * (len(CSV_FIELDS) - 1) + ["extra"])  # a field too many
    metrics.write_text("\n".join(lines[:3] + [too_long, "x,y"]) + "\n")
    with pytest.warns(UserWarning, match=r"metrics\.csv: dropped 3 unreadable rows"):
        Trainer(train_config(tiny_model, dataset_root, out, steps=6, resume="auto")).fit()
    rows = [r.split(",") for r in metrics.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "5", "6"] and all(len(r) == len(CSV_FIELDS) for r in rows)


def test_output_dir_that_is_a_file(tiny_model, dataset_root, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(train_cli(tiny_model, dataset_root, out)) == 2
    err = error_line(capsys.readouterr().err)
    assert f"{out}: --out is an existing file, not a folder" in err
    assert out.read_text() == "mine"
