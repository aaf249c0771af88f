"""Training-memory estimate for Depth Anything V2 (Small / Base / Large) with westar.

The model is built on PyTorch's meta device (shapes only, no memory), LoRA is added as
`westar train` does, and one student forward runs under `saved_tensors_hooks`: every
tensor autograd keeps for the backward is counted once (by storage), frozen weights
excluded (they are counted as parameters). Then

    total = weights (fp32, counted from the parameters; the teacher shares them)
          + LoRA adapters, their gradients, AdamW's two moments and the EMA copy
          + saved activations (x 0.5 for tensors autocast computes in bf16)
          + the backward's transient: twice the largest single layer's saved bytes
          + the losses' buffers (float32 prediction, teacher, instances, grads: 6 maps)
          + a fixed 1 GiB for the CUDA context, cuBLAS/cuDNN workspaces and fragmentation

Attention: on a GPU, SDPA's flash / memory-efficient kernels keep only the output and a
log-sum-exp per query; the meta (math) path keeps the softmax matrix. The estimate drops
saved (N x N) attention maps and adds the log-sum-exp instead.

    python benchmarks/memory_estimate.py --arch large --size 518 --batch 4 [--checkpointing]
    python benchmarks/memory_estimate.py --check        # estimate vs measured RSS on CPU

`--check` validates the method: it estimates a smaller configuration in float32 (what
the CPU runs) and measures the same student forward + backward in a fresh process (peak
RSS minus RSS before the step), and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = {  # Depth Anything V2 on the hub: backbone width, depth, heads, neck, fusion
    "small": dict(hidden=384, layers=12, heads=6, neck=[48, 96, 192, 384], fusion=64,
                  out=[3, 6, 9, 12]),
    "base": dict(hidden=768, layers=12, heads=12, neck=[96, 192, 384, 768], fusion=128,
                 out=[3, 6, 9, 12]),
    "large": dict(hidden=1024, layers=24, heads=16, neck=[256, 512, 1024, 1024], fusion=256,
                  out=[5, 12, 18, 24]),
    # not a released size: the tests' 1 M parameter model, for CI's CPU runs of
    # scripts/gpu_train_check.py and benchmarks/train_step.py (--profile / --model tiny)
    "tiny": dict(hidden=96, layers=6, heads=3, neck=[24, 48, 96, 96], fusion=32,
                 out=[2, 4, 5, 6]),
}  # fmt: skip
GiB = 2**30


def build(arch: str, device: str = "meta"):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    a = ARCHS[arch]
    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=a["hidden"], num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"], out_indices=a["out"], reshape_hidden_states=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=a["hidden"], patch_size=14,
        neck_hidden_sizes=a["neck"], fusion_hidden_size=a["fusion"], head_hidden_size=32,
    )  # fmt: skip
    with torch.device(device):
        model = DepthAnythingForDepthEstimation(config)
    return model


def _lora(model, checkpointing: bool):
    from westar.model import add_lora, enable_gradient_checkpointing, set_train_mode

    if checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model)
    set_train_mode(model)
    return model


def saved_activations(model, batch: int, size: int, device: str = "meta") -> dict:
    """Bytes autograd saves in one student forward (float32), split by kind."""
    frozen = {p.untyped_storage()._cdata for p in model.parameters() if not p.requires_grad}
    seen: set[int] = set()
    tokens = (size // 14) ** 2 + 1
    stats = {"saved": 0, "attention_maps": 0, "largest": 0, "tensors": 0}
    per_layer: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key in frozen or key in seen:
            return t
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        if t.dim() >= 2 and t.shape[-1] == tokens and t.shape[-2] == tokens:
            stats["attention_maps"] += nbytes
        else:
            stats["saved"] += nbytes
        stats["largest"] = max(stats["largest"], nbytes)
        stats["tensors"] += 1
        return t

    x = torch.zeros(batch, 3, size, size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixel_values=x)
    stats["per_layer"] = per_layer
    stats["tokens"] = tokens
    return stats


def estimate(arch: str, size: int, batch: int, checkpointing: bool, bf16: bool) -> dict:
    model = _lora(build(arch), checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = saved_activations(model, batch, size)
    a = ARCHS[arch]
    act_scale = 0.5 if bf16 else 1.0
    lse = batch * a["heads"] * act["tokens"] * 4 * a["layers"]  # flash attention's log-sum-exp
    saved = act["saved"] * act_scale + lse
    transient = 2 * act["largest"] * act_scale
    if checkpointing:  # one layer is recomputed at a time: its activations come back
        transient += act["saved"] * act_scale / max(a["layers"], 1) * 2
    losses = 6 * batch * size * size * 4
    parts = {
        "weights": n_params * 4,
        "lora_state": n_lora * 4 * 5,  # weights, grads, 2 Adam moments, EMA teacher
        "activations": saved,
        "backward_transient": transient,
        "losses": losses,
        "cuda_context_and_margin": 1 * GiB,
    }
    return {
        "arch": arch, "size": size, "batch": batch, "checkpointing": checkpointing,
        "bf16": bf16, "parameters": n_params, "lora_parameters": n_lora,
        "parts_gib": {k: round(v / GiB, 3) for k, v in parts.items()},
        "total_gib": round(sum(parts.values()) / GiB, 2),
        "attention_maps_if_materialized_gib": round(act["attention_maps"] * act_scale / GiB, 2),
    }  # fmt: skip


def measure_cpu(arch: str, size: int, batch: int, checkpointing: bool) -> float:
    """Peak RSS growth (bytes) of one student forward + backward (the second one, after a
    warm-up; the peak is reset through /proc/self/clear_refs), fresh process, fp32."""
    code = f"""
import resource, torch, json, sys
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.memory_estimate import build, _lora
torch.manual_seed(0)
model = _lora(build({arch!r}, "cpu"), {checkpointing})
x = torch.rand({batch}, 3, {size}, {size})
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def step():
    out = model(pixel_values=x).predicted_depth
    out.float().mean().backward()
    for p in model.parameters():
        p.grad = None
step()  # warm-up: lazily loaded code, thread pools, allocator arenas
base = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
step()
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({{"grown": peak - base}}))
"""
    # Every block >= 64 KiB through mmap, returned to the system when freed: the RSS then
    # follows the live tensors instead of what glibc's arenas keep after a free.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["grown"]
    raise RuntimeError(out.stderr[-2000:])


def check(arch: str, size: int, batch: int, checkpointing: bool) -> dict:
    """Estimated vs measured step memory (activations + transient + output; fp32, CPU)."""
    model = _lora(build(arch), checkpointing)
    act = saved_activations(model, batch, size)
    a = ARCHS[arch]
    lse = batch * a["heads"] * act["tokens"] * 4 * a["layers"]
    est = act["saved"] + lse + 2 * act["largest"]
    if checkpointing:
        est += act["saved"] / a["layers"] * 2
    measured = measure_cpu(arch, size, batch, checkpointing)
    return {"arch": arch, "size": size, "batch": batch, "checkpointing": checkpointing,
            "estimated_mib": round(est / 2**20), "measured_mib": round(measured / 2**20),
            "ratio": round(measured / est, 2)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="large")
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--check", action="store_true", help="validate on CPU (small configs)")
    args = p.parse_args(argv)
    if args.check:
        for size, batch, ckpt in ((266, 2, False), (266, 2, True), (518, 1, False)):
            print(json.dumps(check("small", size, batch, ckpt)))
        return 0
    print(json.dumps(estimate(args.arch, args.size, args.batch, args.checkpointing,
                              not args.fp32), indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
