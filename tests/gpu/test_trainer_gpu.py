"""The trainer on a CUDA device (issue 20): bf16 autocast dtypes, pinned batches, device
placement of instance maps and pairs, host syncs of a step (and of the augmentations and
the input normalization), gradient checkpointing.

A tiny random-init Depth Anything V2 (tests/trainer/helpers.py); the whole trainer at
Depth Anything V2 Small size runs in scripts/gpu_check.sh's trainer stage.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

from tests.trainer.helpers import make_dataset, make_tiny_depth_anything, train_config
from westar.data import collate

ROOT = str(Path(__file__).resolve().parents[2])
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_depth_anything(tmp_path_factory.mktemp("model") / "tiny-dav2")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # mixed aspect ratios: the crops keep them (resize the shorter side, then cut)
    root = tmp_path_factory.mktemp("data") / "ds"
    make_dataset(root, n=4, size=(70, 98))
    return root


def make_trainer(model, data, out, **overrides):
    from accelerate.state import AcceleratorState

    from westar.train import Trainer

    values = dict(mixed_precision="bf16", num_workers=0, cpu=False)
    values.update(overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision per test
    trainer = Trainer(train_config(model, data, out, **values))
    assert trainer.accelerator.device.type == "cuda"
    return trainer


def pinned_batch(trainer, n=4):
    """A batch as the trainer's DataLoader hands it over on CUDA (pin_memory=True)."""
    batch = collate([trainer.dataset[(i, 0)] for i in range(n)])
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def syncs_of(fn) -> list[str]:
    """Where `fn` runs a synchronizing CUDA operation (torch's sync debug mode): for each,
    "westar_ops" if a frame of westar_ops/ is on the Python stack (the ops call through
    torch's dispatcher, whose frames come last), else the innermost frame of this
    repository, file:line."""
    found: list[str] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        if any("/westar_ops/" in f.filename for f in stack):
            found.append("westar_ops")
            return
        ours = [f for f in stack if f.filename.startswith(ROOT)]
        where = ours[-1] if ours else stack[-1]
        found.append(f"{where.filename}:{where.lineno} ({filename}:{lineno})")

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def test_augment_and_normalize_do_not_sync(tiny_model):
    """The augmentations' constants (gray weights, YIQ matrices and the inverse) and the
    model's mean / std go to the device once, not at every call: a tensor built from
    Python numbers on a GPU, and torch.linalg.inv there, wait for the device."""
    from westar.augment import step_generator, strong_augment, weak_augment
    from westar.model import load_depth_model

    depth_model = load_depth_model(str(tiny_model))
    x = torch.rand(2, 3, 28, 28).pin_memory().cuda(non_blocking=True)

    def run():
        gen = step_generator(0, 1)
        weak = weak_augment(x, gen, 0.2)
        strong = strong_augment(x, gen, blur_prob=1.0, gray_prob=1.0, noise_prob=1.0)
        return depth_model.normalize(weak), depth_model.normalize(strong)

    run()  # the first call makes the constants
    assert syncs_of(run) == []


@pytest.mark.parametrize("pseudo_label", ["teacher", "depth"])
def test_step_syncs_only_inside_the_ops(tiny_model, data_root, tmp_path, pseudo_label):
    """A training step on CUDA waits for the device only where westar_ops reads back its
    context count (docs/trainer.md: at most two); with pseudo_label="depth" the target
    used to be made on the CPU and copied from pageable memory (a sync every step)."""
    trainer = make_trainer(tiny_model, data_root, tmp_path, pseudo_label=pseudo_label)
    batch = pinned_batch(trainer)
    trainer.train_step(batch, step=0)  # warm-up: lazy initialisations, optimizer state
    found = syncs_of(lambda: trainer.train_step(batch, step=1))
    outside = [s for s in found if s != "westar_ops"]
    assert outside == [], found
    assert len(found) <= 2, found


def test_bf16_autocast_dtypes_and_placement(tiny_model, data_root, tmp_path, monkeypatch):
    """Under bf16 autocast the encoder computes in bf16 for the student and the teacher,
    the loss and its parts are float32 device tensors, the LoRA gradients float32 and
    finite; instance maps and the outputs reach the ops on one device, in float32."""
    import westar_ops

    trainer = make_trainer(tiny_model, data_root, tmp_path)
    batch = pinned_batch(trainer)
    inner = []
    layer = next(m for n, m in trainer.unwrapped.named_modules() if n.endswith("q_proj"))
    hook = layer.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    student, teacher = trainer.predictions(batch, step=0)
    hook.remove()
    assert inner == [torch.bfloat16, torch.bfloat16]  # teacher, then student
    # Accelerate returns the prepared (student) model's outputs in float32
    assert student.dtype in (torch.float32, torch.bfloat16) and student.is_cuda
    assert teacher.is_cuda and not teacher.requires_grad
    seen = {}
    original = westar_ops.sa_hdn_loss

    def spy(pred, target, instances, valid, **kw):
        seen["devices"] = {t.device.type for t in (pred, target, instances, valid)}
        seen["dtypes"] = (pred.dtype, target.dtype, instances.dtype)
        return original(pred, target, instances, valid, **kw)

    monkeypatch.setattr(westar_ops, "sa_hdn_loss", spy)
    total, parts = trainer.loss(batch, step=0)
    monkeypatch.undo()
    assert seen["devices"] == {"cuda"}
    assert seen["dtypes"][:2] == (torch.float32, torch.float32)
    assert total.dtype == torch.float32 and total.is_cuda
    for v in parts.values():
        assert v.dtype == torch.float32 and v.is_cuda
    total.backward()
    grads = [p.grad for n, p in trainer.unwrapped.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loader_hands_over_pinned_batches(tiny_model, data_root, tmp_path):
    """With DataLoader workers, every tensor of a CUDA run's batch is in pinned memory
    (so that the step's non_blocking copies do not wait)."""
    trainer = make_trainer(tiny_model, data_root, tmp_path, num_workers=2, batch_size=2)
    batch = next(iter(trainer.loader(0, 1)))
    for key in ("image", "instances", "pairs", "labels"):
        assert batch[key].is_pinned(), key
    parts = trainer.train_step(batch, step=0)
    assert torch.isfinite(parts["loss"]).item()


def test_gradient_checkpointing_same_step_under_bf16(tiny_model, data_root, tmp_path):
    """Recomputing the encoder layers in the backward (under bf16 autocast) gives the
    same loss and, to bf16 round-off, the same LoRA gradients."""

    def loss_and_grads(ckpt: bool):
        trainer = make_trainer(tiny_model, data_root, tmp_path / str(ckpt),
                               gradient_checkpointing=ckpt)  # fmt: skip
        total, _ = trainer.loss(pinned_batch(trainer), step=0)
        total.backward()
        grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters()
                 if "lora_" in n}  # fmt: skip
        return total.detach(), grads

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    flat_a = torch.cat([g.flatten() for g in grads_a.values()])
    flat_b = torch.cat([grads_b[n].flatten() for n in grads_a])
    assert (flat_a - flat_b).norm() <= 2e-2 * flat_a.norm()
