"""Issue 12: aspect-keeping crops, a step without host reads, accumulation, checkpointing."""

from __future__ import annotations

import math
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.test_training import fixed_batch, lora_state, make_cfg
from westar.data import AdaptationDataset, crop_offset, relation_to_label, resize_keep_aspect
from westar.train import StepBatchSampler, Trainer

# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "src,out",
    [((37, 83), (28, 42)), ((90, 41), (42, 28)), ((200, 150), (56, 56)), ((56, 56), (56, 56)),
     ((1080, 1920), (518, 518)), ((333, 500), (518, 518)), ((10, 700), (28, 28))],
)  # fmt: skip
def test_resize_keeps_aspect_and_covers_the_crop(src, out):
    rh, rw = resize_keep_aspect(src, out, 14)
    assert rh % 14 == 0 and rw % 14 == 0 and rh >= out[0] and rw >= out[1]
    # one scale for both sides, up to the rounding to the patch (< one patch per side)
    scale = max(out[0] / src[0], out[1] / src[1])
    assert src[0] * scale - 1e-6 <= rh < src[0] * scale + 14 or rh == out[0]
    assert src[1] * scale - 1e-6 <= rw < src[1] * scale + 14 or rw == out[1]
    # the binding side is exactly the crop side (rounded up to the patch)
    binding = 0 if out[0] / src[0] >= out[1] / src[1] else 1
    assert (rh, rw)[binding] == math.ceil(out[binding] / 14) * 14
    top, left = crop_offset((rh, rw), out, 5)
    assert 0 <= top <= rh - out[0] and 0 <= left <= rw - out[1]
    assert crop_offset((rh, rw), out, None) == ((rh - out[0]) // 2, (rw - out[1]) // 2)


def _ramp_dataset(root, sizes, rng, instances_as_blocks=True):
    """Images whose red channel encodes the depth (a smooth ramp plus a bump), their
    depth maps, block instance maps and pairs from `westar pairs`."""
    from westar.pairs import make_pairs_file

    for sub in ("images", "depth", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        bump = np.exp(-(((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2))
        depth = 1.0 + 2.5 * xx / w + 1.5 * yy / h - 1.5 * bump
        red = np.round(depth * 40.0)  # 1..5 m -> 40..200: monotone in depth
        rgb = np.stack([red, np.full_like(red, 90), np.full_like(red, 30)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"s{i}.png")
        np.save(root / "depth" / f"s{i}.npy", (red / 40.0).astype(np.float32))
        blocks = (yy // 7).astype(np.int64) * 1000 + (xx // 5).astype(np.int64) + 1
        Image.fromarray(blocks.astype(np.uint16) % 60000).save(root / "instances" / f"s{i}.png")
    make_pairs_file(root / "images", root / "depth", root / "pairs.json", samples=30)
    return root


@pytest.mark.parametrize("out", [(28, 42), (42, 28), (56, 56)])
def test_pairs_and_instances_follow_the_crop(tmp_path, out):
    """A pair's label still holds on the transformed pixels; instance maps stay aligned."""
    from westar.data import load_pairs, read_instances

    sizes = [(37, 83), (90, 41), (150, 200), (45, 45)]  # up- and downsampling
    root = _ramp_dataset(tmp_path, sizes, np.random.default_rng(0))
    ds = AdaptationDataset(
        root / "images", out, root / "instances", root / "pairs.json", patch_size=14
    )
    annotated = load_pairs(root / "pairs.json")
    checked = kept_total = 0
    for i, (h, w) in enumerate(sizes):
        src_inst = read_instances(root / "instances" / f"s{i}.png")[0]
        for seed in (1, 2, 3):
            item = ds[(i, seed)]
            top, left, rh, rw = item["crop"].tolist()
            assert item["image"].shape == (3, *out) and item["instances"].shape == (1, *out)
            # the image is the aspect-kept resize, cropped
            ref = Image.open(root / "images" / f"s{i}.png").resize((rw, rh), Image.BICUBIC)
            ref = np.asarray(ref.crop((left, top, left + out[1], top + out[0])), np.float32)
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy() * 255, ref)
            # instances: nearest-exact source pixel of each output pixel
            ys = np.minimum(((np.arange(out[0]) + top + 0.5) * h / rh).astype(int), h - 1)
            xs = np.minimum(((np.arange(out[1]) + left + 0.5) * w / rw).astype(int), w - 1)
            np.testing.assert_array_equal(item["instances"][0].numpy(), src_inst[np.ix_(ys, xs)])
            # every kept pair: its label is the order of the transformed pixels
            red = item["image"][0].numpy() * 255  # = 40 * depth
            for (a, b), label in zip(item["pairs"].tolist(), item["labels"].tolist()):
                da, db = red[a[0], a[1]], red[b[0], b[1]]
                if label != 0:  # disparity space: +1 means a is closer (smaller depth)
                    assert (da < db) == (label == 1), (i, seed, a, b, da, db, label)
                    checked += 1
            # the dropped pairs are exactly those with a point outside the window
            n_in = 0
            for pair in annotated[f"s{i}"]["pairs"]:
                inside = all(
                    top <= (y + 0.5) * rh / h < top + out[0]
                    and left <= (x + 0.5) * rw / w < left + out[1]
                    for x, y in (pair["a"], pair["b"])
                )
                n_in += inside
            assert item["pairs"].shape[0] == n_in
            kept_total += n_in
    assert checked > 50 and kept_total > 0


def test_crops_are_reproducible_and_vary(dataset_root, tmp_path):
    root = _ramp_dataset(tmp_path, [(40, 100)], np.random.default_rng(1))
    ds = AdaptationDataset(root / "images", (28, 28), root / "instances", root / "pairs.json")
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["pairs"], b["pairs"])
    lefts = {ds[(0, s)]["crop"][1].item() for s in range(20)}
    assert len(lefts) > 3  # 28 x 70 resized, 43 positions to draw from
    centre = AdaptationDataset(root / "images", (28, 28), crop="center")[0]["crop"].tolist()
    assert centre == [0, 21, 28, 70]
    labels = [relation_to_label(p) for p in ("farther", "closer")]
    assert labels == [-1, 1]
    sampler = StepBatchSampler(10, 2, seed=0, start=0, end=3, accum=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    # crop seeds are a function of (seed, micro-step, rank): the same when asked again
    assert batches == list(StepBatchSampler(10, 2, seed=0, start=0, end=3, accum=2))
    assert [b[0][1] for b in batches] != [b[1][1] for b in batches]
    resumed = list(StepBatchSampler(10, 2, seed=0, start=1, end=3, accum=2))
    assert resumed == batches[2:]


# --------------------------------------------------------------------------- the step


def test_loss_parts_are_device_tensors(tiny_model, dataset_root, tmp_path):
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path))
    with torch.no_grad():
        for p in (p for n, p in trainer.unwrapped.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.02)  # a non-zero regularizer
        total, parts = trainer.loss(fixed_batch(trainer), step=0)
    assert set(parts) == {"loss", "st", "weak", "reg"}
    for v in parts.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    cfg = trainer.cfg
    weighted = cfg.lambda_st * parts["st"] + cfg.lambda_w * parts["weak"]
    weighted = weighted + cfg.lambda_r * parts["reg"]
    torch.testing.assert_close(parts["loss"], weighted)
    assert float(parts["st"]) > 0 and float(parts["weak"]) > 0 and float(parts["reg"]) > 0


def test_step_reads_nothing_back_but_the_ops_context_count(tiny_model, dataset_root, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Every host read of a tensor value (item, float, int, bool, tolist) during a step
    would be a device sync on a GPU; the only one allowed is inside westar_ops."""
    cfg = make_cfg(tiny_model, dataset_root, tmp_path, augment=False, max_grad_norm=1.0)
    trainer = Trainer(cfg)
    batch = fixed_batch(trainer)
    trainer.train_step(batch, step=0)  # warm-up (lazy initialisations)
    reads: list[str] = []
    # AdamW's step counters live on the CPU even for a GPU model (not capturable): free
    host_side = {id(s["step"]) for s in trainer.optimizer.state.values()}

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            if id(self) in host_side:
                return original(self, *a, **k)
            frames = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f[0]]
            reads.append(f"{name} at {frames[-1].filename}:{frames[-1].lineno}")
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
        spy(name)
    parts = trainer.train_step(batch, step=1)
    monkeypatch.undo()
    outside = [r for r in reads if "westar_ops" not in r]
    assert outside == []
    assert len(reads) <= 2, reads  # sa_hdn_loss's context count (documented)
    assert isinstance(parts["loss"], torch.Tensor)


def test_nonfinite_loss_is_caught_at_the_next_log_or_save(tiny_model, dataset_root, tmp_path):
    cfg = make_cfg(tiny_model, dataset_root, tmp_path, steps=6, log_every=4, save_every=3)
    trainer = Trainer(cfg)
    real_loss = trainer.loss

    def poisoned(batch, step, augment=None, micro=0):
        total, parts = real_loss(batch, step, augment, micro)
        if step == 1:
            total = total * float("nan")
            parts = dict(parts, loss=parts["loss"] * float("nan"))
        return total, parts

    trainer.loss = poisoned
    with pytest.raises(FloatingPointError, match="step 1 .*found at step 3"):
        trainer.fit()
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(
        ckpts.iterdir()
    )  # the step-3 checkpoint would hold NaN weights: not written
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == [rows[0]]  # nothing logged: the first log step (4) is never reached


def test_log_every_logs_real_values(tiny_model, dataset_root, tmp_path):
    cfg = make_cfg(tiny_model, dataset_root, tmp_path, steps=5, log_every=2, save_every=5)
    last = Trainer(cfg).fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "5"]
    assert last["step"] == 5 and isinstance(last["loss"], float) and math.isfinite(last["loss"])


def test_grad_accum_equals_the_large_batch(tiny_model, dataset_root, tmp_path):
    """2 micro-batches of 2 = one batch of 4 (grid HDN and the regularizer are per-image
    means over equal pixel counts, so the averaged gradients agree)."""
    kw = dict(augment=False, lambda_w=0.0, hdn="grid", max_grad_norm=0.0, steps=2, lr=1e-2)
    big = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "a", batch_size=4, **kw))
    small = Trainer(
        make_cfg(tiny_model, dataset_root, tmp_path / "b", batch_size=2, grad_accum=2, **kw)
    )
    assert len(small.loader(0, 2)) == 4
    for t in (big, small):  # same non-zero start (at B = 0 the student is the teacher)
        with torch.no_grad():
            for n, p in t.unwrapped.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    big.fit()
    small.fit()
    a, b = lora_state(big), lora_state(small)
    start = {n: torch.linspace(-0.05, 0.05, t.numel()).view_as(t) for n, t in a.items()}
    assert any(not torch.allclose(a[n], start[n]) for n in a if "lora_B" in n)  # it trained
    # The two runs do the same float32 math summed in another order (and the CPU loss
    # kernel sums in 16 AVX-512 lanes or in the portable loops' lanes, by CPU: same
    # precision, other order; test_cpu_paths_keep_float32_precision). Such rounding moves
    # a parameter by the *update's* size times the gradient's relative error, not by the
    # parameter's size: AdamW steps are lr * m / (sqrt(v) + eps), at most about lr per
    # step, and a float32 sum of n terms is off by at most n * 2^-24 of the sum of their
    # sizes. The largest sum here runs over the batch's pixels, so
    #     |a - b| <= steps * lr * n_pixels * 2^-24   (rtol 0: |theta| does not enter).
    # (The earlier atol 1e-6 + rtol 1e-4 * |theta| was a guess that failed on an AVX-512
    # CPU by 1.5e-6 for parameters near 0.)
    n_pixels = 4 * 56 * 56
    atol = kw["steps"] * kw["lr"] * n_pixels * 2.0**-24  # 1.5e-5
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0.0, atol=atol)
    plain = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / "c", batch_size=2, **kw))
    with torch.no_grad():
        for n, p in plain.unwrapped.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    plain.fit()
    c = lora_state(plain)
    assert any(not torch.allclose(c[n], b[n], rtol=1e-3) for n in c if "lora_B" in n)
    # a real difference (half the data per step) is far outside that tolerance
    assert max(float((c[n] - b[n]).abs().max()) for n in c) > 100 * atol


@pytest.mark.parametrize("isa", ["generic", "auto"])
def test_cpu_paths_keep_float32_precision(isa, monkeypatch):
    """sa_hdn_loss's AVX-512 loops (used where the CPU has them) and its portable ones:
    each within float32 rounding of the same loss evaluated in float64, so where they
    differ it is summation order, not lost precision."""
    import westar_ops

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 1, 56, 56, generator=g) * 3 + 10
    target = torch.randn(4, 1, 56, 56, generator=g) * 2 + 5
    inst = westar_ops.grid_instances(4, 56, 56, (4, 2))  # the global context: 3136 pixels
    monkeypatch.setenv("WESTAR_CPU_ISA", "generic")  # float64 has the portable loops only
    p64 = pred.double().requires_grad_(True)
    westar_ops.sa_hdn_loss(p64, target.double(), inst).backward()
    monkeypatch.setenv("WESTAR_CPU_ISA", isa)
    p32 = pred.clone().requires_grad_(True)
    loss = westar_ops.sa_hdn_loss(p32, target, inst)
    loss.backward()
    ref = westar_ops.sa_hdn_loss(pred.double(), target.double(), inst)
    eps = torch.finfo(torch.float32).eps
    assert abs(float(loss) - float(ref)) <= 4 * eps * abs(float(ref))
    # each gradient element within a few float32 ulps of the largest one
    err = (p32.grad.double() - p64.grad).abs().max()
    assert float(err) <= 4 * eps * float(p64.grad.abs().max())


def _saved_bytes(trainer, batch) -> tuple[int, dict]:
    """Bytes autograd keeps for the student's backward, and the LoRA gradients."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    trainer.optimizer.zero_grad(set_to_none=True)
    from westar.model import set_train_mode

    set_train_mode(trainer.model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = trainer.loss(batch, step=0, augment=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if "lora_" in n}
    return total, grads


def test_gradient_checkpointing_same_grads_less_memory(tiny_model, dataset_root, tmp_path):
    def trainer(ckpt):
        t = Trainer(make_cfg(tiny_model, dataset_root, tmp_path / str(ckpt),
                             gradient_checkpointing=ckpt))  # fmt: skip
        with torch.no_grad():
            for n, p in t.unwrapped.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        return t

    plain, ckpt = trainer(False), trainer(True)
    batch = fixed_batch(plain)
    bytes_plain, g_plain = _saved_bytes(plain, batch)
    bytes_ckpt, g_ckpt = _saved_bytes(ckpt, batch)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in g_plain.values())
    assert bytes_ckpt < 0.75 * bytes_plain, (bytes_ckpt, bytes_plain)


def test_teacher_runs_without_dropout(tiny_model, dataset_root, tmp_path):
    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, lora_dropout=0.5))
    with torch.no_grad():
        for n, p in trainer.unwrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        trainer.teacher.update(trainer.unwrapped)  # a teacher whose adapters matter
        trainer.teacher.decay = 0.0
        trainer.teacher.update(trainer.unwrapped)
    from westar.model import set_train_mode

    set_train_mode(trainer.model)
    batch = fixed_batch(trainer)
    with torch.no_grad():
        s1, t1 = trainer.predictions(batch, step=0, augment=False)
        s2, t2 = trainer.predictions(batch, step=0, augment=False)
    assert torch.equal(t1, t2)  # no dropout in the teacher
    assert not torch.equal(s1, s2)  # the student's LoRA dropout is on
    dropout = [m for n, m in trainer.unwrapped.named_modules() if n.endswith("lora_dropout")]
    assert dropout and all(any(x.training for x in m.modules()) for m in dropout)


def test_grouped_regularizer_equals_the_op_per_layer(tiny_model, dataset_root, tmp_path):
    import westar_ops
    from westar.losses import lora_regularizer
    from westar.model import lora_layers

    trainer = Trainer(make_cfg(tiny_model, dataset_root, tmp_path, lora_alpha=12.0))
    model = trainer.unwrapped
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    layers = lora_layers(model)
    grouped = lora_regularizer(model, layers)
    (g_grouped,) = torch.autograd.grad(grouped, [layers[3][1].lora_B["default"].weight])
    per_layer = sum(
        westar_ops.lora_delta_sq_norm(
            m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        )
        for _, m in layers
    )
    (g_op,) = torch.autograd.grad(per_layer, [layers[3][1].lora_B["default"].weight])
    torch.testing.assert_close(grouped, per_layer, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_grouped, g_op, rtol=1e-5, atol=1e-5 * float(g_op.abs().max()))
    assert lora_regularizer(model).item() == grouped.item()  # the walk gives the same
