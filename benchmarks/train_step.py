"""One WeSTAR training step: westar's trainer vs a straightforward researcher's step.

Both steps do the same work on the same model weights, batch and machine: the EMA teacher
predicts on the weak view (no grad), the LoRA student on the strong view, loss =
SA-HDN + 0.001 * ordinal + LoRA regularizer, backward, grad clip, AdamW, EMA update.

- westar: `westar.train.Trainer.train_step` (fused westar_ops kernels, teacher = EMA of
  the adapter tensors swapped into the student, loss parts kept as device tensors).
- researcher: the teacher as a full second copy of the model (EMA over every tensor),
  the plain-PyTorch reference losses of `westar_ops.reference` for SA-HDN and the LoRA
  regularizer, the ordinal loss as a Python loop over pairs, and a float() per loss part
  every step (for logging).

The two run interleaved (A B B A ...) in one process so that a loaded machine slows both
alike. Reported per variant: median and minimum step time (on a machine shared with other
jobs the minimum is the least disturbed) and steps/s; the losses' share of the
step (forward + backward of the loss terms alone, timed on that step's own model
outputs); peak memory = what the variant holds between steps (models, teacher, optimizer
state; counted tensor by tensor) + what a step adds on top (CUDA: max_memory_allocated
during the step minus before it; CPU: peak RSS of a separate process running 2 steps of
only that variant, minus its RSS before the first step).

    python benchmarks/train_step.py                         # CPU: shipped model, 126 px
    python benchmarks/train_step.py --model small --size 518 --steps 3
    python benchmarks/train_step.py --model small --size 518 --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import westar_ops  # noqa: E402
from westar_ops import reference  # noqa: E402

SHIPPED = ROOT / "westar" / "assets" / "source_model"


# --------------------------------------------------------------------------- setup


def small_sized_model(path: Path) -> Path:
    """Depth Anything V2 Small's architecture (24.8 M parameters), random weights."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12,
        num_attention_heads=6, out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=384, patch_size=14,
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
    )  # fmt: skip
    DepthAnythingForDepthEstimation(config).save_pretrained(str(path))
    return path


def make_data(root: Path, n: int, size: int, samples: int) -> Path:
    """n images of boxes on a ramp with instance maps, depth and ordinal pairs."""
    from westar.pairs import make_pairs_file

    rng = np.random.default_rng(0)
    for sub in ("images", "instances", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        depth = 4 + 4 * (1 - yy / size) + 0.5 * xx / size
        rgb = np.repeat((40 + 150 * yy / size)[..., None], 3, -1)
        inst = np.ones((size, size), np.uint16)
        for k in range(2, 14):
            y0, x0 = rng.integers(0, size - size // 4, 2)
            s = rng.integers(size // 12, size // 4)
            depth[y0 : y0 + s, x0 : x0 + s] = rng.uniform(1, 4)
            rgb[y0 : y0 + s, x0 : x0 + s] = rng.uniform(0, 255, 3)
            inst[y0 : y0 + s, x0 : x0 + s] = k
        Image.fromarray(rgb.astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(inst).save(root / "instances" / f"{i:03d}.png")
        np.save(root / "depth" / f"{i:03d}.npy", depth)
    make_pairs_file(root / "images", root / "depth", root / "pairs.json", samples=samples)
    return root


def build_trainer(model: Path, data: Path, size: int, batch: int, device: str):
    from westar.config import TrainConfig
    from westar.data import collate
    from westar.train import Trainer

    cfg = TrainConfig(
        model=str(model), data=str(data), output_dir=str(data / "run"), image_size=(size, size),
        batch_size=batch, steps=10_000, progress=False, tensorboard=False, num_workers=0,
        cpu=device == "cpu", mixed_precision="no",
        ordinal_norm="raw",  # the researcher's step below is the raw ordinal loss
    )  # fmt: skip
    trainer = Trainer(cfg)
    batch_dict = collate([trainer.dataset[(i, 0)] for i in range(batch)])
    return trainer, batch_dict


class ResearcherStep:
    """The straightforward step: full teacher copy, reference losses, loops, float()s."""

    def __init__(self, trainer):
        from westar.model import add_lora, load_depth_model

        cfg = trainer.cfg
        self.cfg, self.device = cfg, trainer.accelerator.device
        self.depth = load_depth_model(cfg.model)
        self.student = add_lora(
            self.depth.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout
        ).to(self.device)
        self.teacher = copy.deepcopy(self.student).eval()  # a second full model
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.log: list[dict] = []

    def outputs(self, batch, step):
        from westar.augment import step_generator, strong_augment, weak_augment
        from westar.model import predict

        cfg = self.cfg
        gen = step_generator(cfg.seed, step)
        images = batch["image"].to(self.device)
        with torch.no_grad():
            teacher = predict(self.teacher, self.depth, weak_augment(images, gen, cfg.weak_jitter))
        strong = strong_augment(images, gen, jitter=cfg.jitter, hue=cfg.hue,
                                blur_prob=cfg.blur_prob, blur_sigma=cfg.blur_sigma,
                                noise_prob=cfg.noise_prob, noise_std=cfg.noise_std,
                                gray_prob=cfg.gray_prob)  # fmt: skip
        self.student.train()
        return predict(self.student, self.depth, strong), teacher

    def losses(self, student, teacher, batch):
        cfg = self.cfg
        student, teacher = student.float(), teacher.float()
        st = reference.sa_hdn_loss(
            student, teacher, batch["instances"].to(self.device), torch.isfinite(teacher),
            include_global=cfg.include_global, min_pixels=cfg.min_pixels,
        )  # fmt: skip
        terms = []
        for b in range(student.shape[0]):  # the ordinal loss, pair by pair
            for pair, label in zip(batch["pairs"][b].tolist(), batch["labels"][b].tolist()):
                if label not in (-1, 0, 1):
                    continue
                (ya, xa), (yb, xb) = pair
                d = student[b, ya, xa] - student[b, yb, xb]
                if label == 0:
                    terms.append(cfg.equal_weight * d * d)
                else:
                    terms.append(torch.clamp_min(cfg.margin - label * d, 0))
        weak = torch.stack(terms).mean() if terms else student.sum() * 0
        reg = 0.0
        for module in self.student.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                reg = reg + reference.lora_delta_sq_norm(
                    module.lora_A["default"].weight, module.lora_B["default"].weight,
                    module.scaling["default"],
                )  # fmt: skip
        total = cfg.lambda_st * st + cfg.lambda_w * weak + cfg.lambda_r * reg
        return total, {"loss": total, "st": st, "weak": weak, "reg": reg}

    def step(self, batch, step):
        student, teacher = self.outputs(batch, step)
        total, parts = self.losses(student, teacher, batch)
        self.log.append({k: v.item() for k, v in parts.items()})  # logged every step
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        d = self.cfg.ema_decay
        with torch.no_grad():  # mean teacher over every tensor of the model
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(d).add_(s.detach(), alpha=1 - d)


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def westar_loss_time(trainer, batch, step, device) -> float:
    """Forward + backward of westar's loss terms alone on this step's model outputs."""
    from westar.losses import westar_loss

    with torch.no_grad():
        student, teacher = trainer.predictions(batch, step)
    student = student.detach().requires_grad_(True)

    def run():
        total, _ = westar_loss(student, teacher, batch, trainer.unwrapped, trainer.cfg)
        total.backward()

    t = timed(run, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return t


def researcher_loss_time(res, batch, step, device) -> float:
    with torch.no_grad():
        student, teacher = res.outputs(batch, step)
    student = student.detach().requires_grad_(True)

    def run():
        total, parts = res.losses(student, teacher, batch)
        _ = {k: v.item() for k, v in parts.items()}
        total.backward()

    t = timed(run, device)
    res.optimizer.zero_grad(set_to_none=True)
    return t


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_tensors(opt):
    return [v for state in opt.state.values() for v in state.values()]


def persistent_bytes(trainer, res) -> dict[str, int]:
    """Bytes held between steps: models (parameters, buffers), teacher, optimizer state."""
    w = trainer.unwrapped
    westar = tensor_bytes(
        list(w.parameters()) + list(w.buffers()) + list(trainer.teacher.shadow.values())
        + optimizer_tensors(trainer.optimizer.optimizer)
    )  # fmt: skip
    researcher = tensor_bytes(
        list(res.student.parameters()) + list(res.student.buffers())
        + list(res.teacher.parameters()) + list(res.teacher.buffers())
        + optimizer_tensors(res.optimizer)
    )  # fmt: skip
    return {"westar": westar, "researcher": researcher}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_subprocess(args, variant: str) -> float | None:
    """CPU: (peak RSS - RSS before the first step) of a process running only `variant`."""
    cmd = [sys.executable, __file__, "--model", args.model, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", "2", "--warmup", "0", "--device", "cpu",
           "--only", variant, "--pairs", str(args.pairs)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["step_memory_mb"]
    print(out.stderr[-2000:], file=sys.stderr)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shipped", help="shipped | small | a model directory")
    p.add_argument("--size", type=int, default=126, help="square training crop (a multiple of the model's patch size)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=10, help="anchor samples per image (x3 pairs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the RSS subprocesses")
    p.add_argument("--only", choices=("westar", "researcher"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model == "shipped":
            model = SHIPPED
        elif args.model == "small":
            model = small_sized_model(tmp / "small")
        else:
            model = Path(args.model)
        data = make_data(tmp / "data", args.batch, args.size, args.pairs)
        trainer, batch = build_trainer(model, data, args.size, args.batch, args.device)
        res = ResearcherStep(trainer)
        variants = {
            "westar": (lambda s: trainer.train_step(batch, s),
                       lambda s: westar_loss_time(trainer, batch, s, args.device)),
            "researcher": (lambda s: res.step(batch, s),
                           lambda s: researcher_loss_time(res, batch, s, args.device)),
        }  # fmt: skip
        if args.only:  # the memory probe: one variant, RSS around its steps
            base = rss_mb()
            step_fn = variants[args.only][0]
            for s in range(args.steps):
                step_fn(s)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"step_memory_mb": peak - base}))
            return 0
        names = list(variants)
        for s in range(args.warmup):
            for name in names:
                variants[name][0](s)
        step_t = {n: [] for n in names}
        loss_t = {n: [] for n in names}
        peak = {n: 0.0 for n in names}
        for s in range(args.steps):
            order = names if s % 2 == 0 else names[::-1]  # A B, B A, ...
            for name in order:
                step_fn, loss_fn = variants[name]
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                step_t[name].append(timed(lambda f=step_fn, k=s: f(k), args.device))
                if args.device.startswith("cuda"):
                    peak[name] = max(peak[name], (torch.cuda.max_memory_allocated() - before))
                loss_t[name].append(loss_fn(s))
        if args.device == "cpu" and not args.no_memory:
            for name in names:
                grown = peak_memory_subprocess(args, name)
                peak[name] = grown * 2**20 if grown is not None else 0.0
        held = persistent_bytes(trainer, res)
        for name in names:  # + what the variant holds between steps
            peak[name] = peak[name] + held[name] if peak[name] else 0.0

    n_params = sum(p.numel() for p in trainer.unwrapped.parameters())
    print(f"model {args.model} ({n_params / 1e6:.1f} M parameters), {args.size} px, batch "
          f"{args.batch}, {int((batch['labels'] >= -1).sum())} pairs, {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.steps} interleaved steps each, "
          f"ops backend auto ({', '.join(westar_ops.available_backends(args.device))})")  # fmt: skip
    print("| step | median s/step | min s/step | steps/s (median) | losses fwd+bwd, median s "
          "| losses' share (median / min) | peak MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in names:
        st, lt = statistics.median(step_t[name]), statistics.median(loss_t[name])
        st_min, lt_min = min(step_t[name]), min(loss_t[name])
        mem = f"{peak[name] / 2**20:.0f}" if peak[name] else "n/a"
        print(f"| {name} | {st:.4f} | {st_min:.4f} | {1 / st:.2f} | {lt:.4f} | "
              f"{100 * lt / st:.1f} % / {100 * lt_min / st_min:.1f} % | {mem} |")  # fmt: skip
    ratio = statistics.median(step_t["researcher"]) / statistics.median(step_t["westar"])
    ratio_min = min(step_t["researcher"]) / min(step_t["westar"])
    print(f"westar: {ratio:.2f}x the researcher's steps/s (medians), {ratio_min:.2f}x (minima)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
