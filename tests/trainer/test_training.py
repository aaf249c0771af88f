"""Trainer behaviour on a tiny random-init Depth Anything V2 (CPU, offline)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.helpers import make_tiny_dpt
from tests.trainer.helpers import train_config as make_cfg
from westar.config import TrainConfig
from westar.data import DataError, collate
from westar.losses import lora_regularizer
from westar.model import find_attention_projections, lora_layers
from westar.train import Trainer, find_latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def fixed_batch(trainer, n=4):
    return collate([trainer.dataset[i] for i in range(n)])


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if "lora_" in n}


def test_lora_targets_are_discovered(tiny_model, dataset_root, tmp_path):
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path))
    names = find_attention_projections(trainer.unwrapped)
    assert len(names) == 6 * 3
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj"}
    trainable = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the teacher holds adapter tensors only: no copy of the base weights
    assert set(trainer.teacher.shadow) == {n for n in trainable}
    base = sum(p.numel() for p in trainer.unwrapped.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in trainer.teacher.shadow.values()) < base / 5


def test_defaults_follow_the_paper(tiny_model, dataset_root, tmp_path):
    d = TrainConfig()
    assert (d.lora_rank, d.lora_alpha, d.lora_dropout, d.ema_decay) == (8, 16.0, 0.0, 0.996)
    assert (d.lambda_st, d.lambda_w, d.lambda_r, d.batch_size) == (1.0, 0.001, 1.0, 4)
    assert d.image_size is None and d.hdn == "instances"
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, image_size=None, steps=10))
    assert trainer.cfg.image_size == (126, 126)  # the tiny model's native size
    lora = trainer.unwrapped.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.0)
    assert trainer.teacher.decay == 0.996
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    factor = trainer.scheduler.lr_lambdas[0]  # lr = cfg.lr * factor(step)
    assert [factor(k) for k in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)  # cosine
    assert factor(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_teacher_predicts_with_ema_weights(tiny_model, dataset_root, tmp_path):
    from westar.model import predict

    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, ema_decay=0.5))
    batch = fixed_batch(trainer)
    for step in range(2):
        trainer.train_step(batch, step=step)
    with torch.no_grad():
        student, teacher = trainer.predictions(batch, step=0, augment=False)
        plain = predict(trainer.unwrapped, trainer.depth, batch["image"])
        params = dict(trainer.unwrapped.named_parameters())
        saved = {n: params[n].clone() for n in trainer.teacher.shadow}
        for n, t in trainer.teacher.shadow.items():
            params[n].copy_(t)
        by_hand = predict(trainer.unwrapped, trainer.depth, batch["image"])
        for n, t in saved.items():
            params[n].copy_(t)
    torch.testing.assert_close(student, plain)
    torch.testing.assert_close(teacher, by_hand)
    assert not torch.allclose(teacher, student)  # the teacher lags: it is not the student


def test_step_lowers_loss_and_changes_only_lora(tiny_model, dataset_root, tmp_path):
    # steps=100: the cosine schedule keeps the learning rate up during the 5 steps here
    cfg = make_cfg(tiny_model, dataset_root, tmp_path, lr=3e-4, steps=100, max_grad_norm=0)
    trainer = Trainer(cfg)
    batch = fixed_batch(trainer)
    frozen = {
        n: t.detach().clone()
        for n, t in list(trainer.unwrapped.named_parameters())
        + list(trainer.unwrapped.named_buffers())
        if "lora_" not in n
    }
    before_lora = lora_state(trainer)
    with torch.no_grad():
        loss0, parts0 = trainer.loss(batch, step=0)
    for _ in range(5):
        trainer.train_step(batch, step=0)  # same augmentation every time
    with torch.no_grad():
        loss1, parts1 = trainer.loss(batch, step=0)
    assert float(loss1) < float(loss0), (parts0, parts1)
    assert parts1["st"] < parts0["st"]
    after = dict(
        list(trainer.unwrapped.named_parameters()) + list(trainer.unwrapped.named_buffers())
    )
    for n, t in frozen.items():
        assert torch.equal(after[n], t), f"frozen tensor {n} changed"
    changed = [n for n, t in lora_state(trainer).items() if not torch.equal(t, before_lora[n])]
    assert any("lora_B" in n for n in changed)


def test_teacher_follows_ema_formula(tiny_model, dataset_root, tmp_path):
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, ema_decay=0.9))
    batch = fixed_batch(trainer)
    for step in range(2):
        old = {n: t.clone() for n, t in trainer.teacher.shadow.items()}
        trainer.train_step(batch, step=step)
        student = lora_state(trainer)
        for n, t in trainer.teacher.shadow.items():
            expected = 0.9 * old[n].double() + 0.1 * student[n].double()
            torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-9)
    # swapping the teacher in and out restores the student exactly
    before = lora_state(trainer)
    with trainer.teacher.swapped_in(trainer.unwrapped) as m:
        for n, p in m.named_parameters():
            if "lora_" in n:
                assert torch.equal(p, trainer.teacher.shadow[n])
    assert all(torch.equal(p, before[n]) for n, p in lora_state(trainer).items())


def test_regularizer_equals_explicit_norm(tiny_model, dataset_root, tmp_path):
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path))
    with torch.no_grad():
        for n, p in trainer.unwrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    explicit = 0.0
    layers = lora_layers(trainer.unwrapped)
    assert len(layers) == 18
    for _, layer in layers:
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        assert layer.scaling["default"] == 16 / 8
        explicit += ((layer.scaling["default"] * b @ a) ** 2).sum().item()
    assert lora_regularizer(trainer.unwrapped).item() == pytest.approx(explicit, rel=1e-5)


def test_resume_matches_straight_run(tiny_model, dataset_root, tmp_path):
    straight = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "a"))
    straight.fit()
    first = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "b"))
    first.fit(stop_after=2)  # "killed" after the step-2 checkpoint
    del first
    resumed = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "b", resume="auto"))
    resumed.fit()
    assert resumed.step == 4
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(straight.teacher.shadow[n], resumed.teacher.shadow[n]) for n in a)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    # a checkpoint: the student as a peft adapter, the teacher as flat tensors, no pickled
    # RNG state and no duplicate copies of either adapter
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForDepthEstimation

    ckpt = find_latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_00000004"
    assert not list(ckpt.parent.glob(".tmp-*"))
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter", "optimizer.bin", "rng_rank0.safetensors", "scheduler.bin", "state.json",
        "teacher.safetensors",
    ]  # fmt: skip
    base = AutoModelForDepthEstimation.from_pretrained(str(tiny_model))
    loaded = PeftModel.from_pretrained(base, str(ckpt / "adapter"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == b.keys() and all(torch.equal(got[n], b[n]) for n in b)
    teacher = load_file(str(ckpt / "teacher.safetensors"))
    assert all(torch.equal(teacher[n], resumed.teacher.shadow[n]) for n in b)
    assert any(
        not torch.equal(resumed.teacher.shadow[n], b[n]) for n in b if "lora_B" in n
    )  # student and teacher checkpoints differ


def test_kill_and_resume(tiny_model, dataset_root, tmp_path):
    """SIGKILL a CLI run mid-training; the last checkpoint resumes to the straight result."""
    out = tmp_path / "killed"
    args = [
        sys.executable, "-m", "westar", "train", "--model", str(tiny_model),
        "--data", str(dataset_root), "--output-dir", str(out), "--image-size", "56",
        "--steps", "6", "--batch-size", "4", "--lr", "1e-3", "--save-every", "1",
        "--no-progress", "--no-tensorboard", "--keep-checkpoints", "3",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoints" / "step_00000002").exists():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    latest = find_latest_checkpoint(out)
    assert latest is not None, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert int(latest.name.split("_")[1]) < 6 and not (out / "adapter").exists()
    cfg = dict(steps=6, save_every=1, keep_checkpoints=3)
    resumed = Trainer(make_cfg(tiny_model, dataset_root, out, resume="auto", **cfg))
    resumed.fit()
    straight = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "straight", **cfg))
    straight.fit()
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_to_overwrite(tiny_model, dataset_root, tmp_path):
    Trainer(make_cfg(tiny_model, dataset_root, tmp_path, steps=2)).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(make_cfg(tiny_model, dataset_root, tmp_path, steps=2)).fit()


# name -> (no self-training, no weak labels, no regularizer, hdn): what docs/trainer.md
# says each one does
ABLATION_EFFECTS = {
    "self_training": (False, True, True, "global"),
    "grid_hdn": (False, True, True, "grid"),
    "sa_hdn": (False, True, True, "instances"),
    "sa_hdn_weak": (False, False, True, "instances"),
    "westar": (False, False, False, "instances"),
    "full": (False, False, False, "instances"),
    "no_weak": (False, True, False, "instances"),
    "no_reg": (False, False, True, "instances"),
    "no_sa": (False, False, False, "grid"),
    "weak_only": (True, False, False, "instances"),
}


def test_ablation_names_are_the_ladder_and_the_leave_one_outs():
    from westar.config import ABLATIONS, LADDER

    assert list(LADDER) == ["self_training", "grid_hdn", "sa_hdn", "sa_hdn_weak", "westar"]
    assert set(ABLATIONS) == set(ABLATION_EFFECTS)
    for name, (_, fields) in LADDER.items():  # a ladder name means one recipe everywhere
        assert ABLATIONS[name] == fields


@pytest.mark.parametrize("ablation", list(ABLATION_EFFECTS))
def test_ablations_train(tiny_model, dataset_root, tmp_path, ablation):
    """Each ablation is one flag, changes what it says, and needs only the data it uses."""
    from westar.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", "--ablation", ablation, "--model", str(tiny_model), "--data", str(dataset_root)]
    )
    cfg = config_from_args(args)
    no_st, no_weak, no_reg, hdn = ABLATION_EFFECTS[ablation]
    effects = (cfg.lambda_st == 0, cfg.lambda_w == 0, cfg.lambda_r == 0, cfg.hdn)
    assert effects == (no_st, no_weak, no_reg, hdn)
    missing = str(tmp_path / "missing")
    kw = dict(steps=2, lambda_st=cfg.lambda_st, lambda_w=cfg.lambda_w, lambda_r=cfg.lambda_r,
              hdn=cfg.hdn)  # fmt: skip
    if no_weak:
        kw["pairs_file"] = missing + ".json"  # not read
    uses_instances = hdn == "instances" and not no_st
    if not uses_instances:
        kw["instances_dir"] = missing  # not read
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, **kw))
    batch = fixed_batch(trainer)
    assert batch["instances"].shape[1] == (1 if uses_instances else 0)
    last = trainer.fit()  # 2 steps: at step 1 lora_B is 0 and so is the regularizer
    assert last["step"] == 2 and (last["st"] == 0.0) == no_st
    assert (last["weak"] == 0.0) == no_weak and (last["reg"] == 0.0) == no_reg


def test_oracle_trains_on_ground_truth_depth(tiny_model, dataset_root, tmp_path):
    """pseudo_label="depth" (the sweep's oracle): the target is 1/depth of the same crop,
    invalid depth is unused, the teacher never runs, and the adapters learn from it."""
    import numpy as np

    from westar.data import read_depth
    from westar.train import depth_target

    cfg = make_cfg(tiny_model, dataset_root, tmp_path, steps=2, pseudo_label="depth",
                   hdn="global", lambda_w=0.0, lambda_r=0.0,
                   instances_dir=str(tmp_path / "no"), pairs_file=str(tmp_path / "no.json"))  # fmt: skip
    trainer = Trainer(cfg)
    item = trainer.dataset[(0, 123)]
    top, left, rh, rw = item["crop"].tolist()
    full = read_depth(dataset_root / "depth" / f"{item['stem']}.npy")
    assert (rh, rw) == full.shape  # 56 x 56 images: the crop is the whole image
    np.testing.assert_array_equal(item["depth"].numpy(), full[top : top + 56, left : left + 56])
    batch = fixed_batch(trainer)
    batch["depth"][0, :3, :3] = 0.0  # invalid pixels
    swapped = []
    trainer.teacher.swapped_in = lambda *a: swapped.append(1)  # must not be called
    student, target = trainer.predictions(batch, step=0)
    assert not swapped and student.shape == target.shape
    torch.testing.assert_close(target, depth_target(batch["depth"]), equal_nan=True)
    assert torch.isnan(target[0, :3, :3]).all() and torch.isfinite(target[1]).all()
    torch.testing.assert_close(target[1], 1.0 / batch["depth"][1])
    before = lora_state(trainer)
    del trainer.teacher.swapped_in
    last = trainer.fit()
    assert last["step"] == 2 and last["st"] > 0 and last["weak"] == 0 and last["reg"] == 0
    assert any(not torch.equal(before[n], t) for n, t in lora_state(trainer).items())
    assert TrainConfig.from_dict(cfg.to_dict()).pseudo_label == "depth"
    with pytest.raises(ValueError, match="pseudo_label"):
        make_cfg(tiny_model, dataset_root, tmp_path, pseudo_label="gt")
    with pytest.raises(DataError, match="depth folder not found"):
        Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "x", pseudo_label="depth",
                         depth_dir=str(tmp_path / "nodepth")))  # fmt: skip


def test_ablation_flag_then_explicit_flags(tiny_model):
    from westar.cli import build_parser, config_from_args

    argv = ["train", "--model", str(tiny_model), "--ablation", "no_weak", "--lambda-r", "0.5"]
    cfg = config_from_args(build_parser().parse_args(argv + ["--image-size", "28"]))
    assert (cfg.lambda_w, cfg.lambda_r, cfg.image_size) == (0.0, 0.5, (28, 28))


def test_dpt_model_gets_query_key_value(tmp_path):
    from westar.model import add_lora, load_depth_model, predict

    make_tiny_dpt(tmp_path / "dpt")
    dm = load_depth_model(str(tmp_path / "dpt"))
    names = find_attention_projections(dm.model)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query", "key", "value"}
    assert (dm.patch_size, dm.input_size) == (16, 64)
    model = add_lora(dm.model)
    out = predict(model, dm, torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 64, 64)


def test_dpt_trains_through_the_same_code(tmp_path, dataset_root):
    make_tiny_dpt(tmp_path / "dpt")
    with pytest.raises(ValueError, match="multiples of 16"):
        Trainer(make_cfg(tmp_path / "dpt", dataset_root, tmp_path / "x", image_size=(56, 56)))
    cfg = make_cfg(tmp_path / "dpt", dataset_root, tmp_path / "run", image_size=None, steps=2)
    trainer = Trainer(cfg)
    assert trainer.cfg.image_size == (64, 64)
    trainable = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 3 * 2 and all(".attention.attention." in n for n in trainable)
    before = lora_state(trainer)
    last = trainer.fit()
    assert last["step"] == 2 and last["weak"] > 0 and last["st"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in lora_state(trainer).items())


def test_torchrun_two_processes(tiny_model, dataset_root, tmp_path):
    """Accelerate under torchrun --nproc_per_node 2 (gloo on CPU) runs a few steps.

    One image fails to load during training (tests/trainer/ddp_bad_sample.py; a file bad
    from the start is caught by the upfront check): with --skip-bad, the rank that draws it
    has no batch for that step, and both ranks must skip it together (otherwise the other
    one waits in DDP's all-reduce).
    """
    import json
    import socket

    root = dataset_root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), str(ROOT / "tests" / "trainer" / "ddp_bad_sample.py"),
        "img_005", "train", "--model", str(tiny_model),
        "--data", str(root), "--output-dir", str(out), "--image-size", "56",
        "--steps", "3", "--batch-size", "1", "--save-every", "3", "--no-progress",
        "--no-tensorboard", "--skip-bad", "--log-every", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (own sessions)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stderr = ""
        pytest.fail(f"torchrun run hung:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert "skipping sample 'img_005'" in stderr
    ckpt = out / "checkpoints" / "step_00000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (ckpt / "rng_rank1.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # 3 steps x 2 ranks x 1 image = one epoch: the bad image's step is skipped on both ranks
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2
