"""One-command GPU benchmark of the westar_ops losses: Triton, CUDA C++ and the
plain-PyTorch reference, forward and forward+backward, timed with CUDA events.

    python benchmarks/gpu_bench.py [--repeats 50] [--csv out.csv]

Workloads (benchmarks/workloads.py, the CPU benchmark's): B=4, 518x518, float32,
64 uneven instances + global with 10% invalid pixels; classic HDN grid 4x4 + 2x2 + global;
the ordinal loss with 4096 pairs per image. Reports the median time and the achieved
bandwidth of a byte model (docs/gpu_kernels.md: bytes the CUDA kernels move) against
the device's peak memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import westar_ops  # noqa: E402
from westar_ops import ops, reference  # noqa: E402

try:
    from benchmarks.workloads import grid_workload, instance_workload, ordinal_workload
except ImportError:  # pragma: no cover - run from another directory layout
    from workloads import grid_workload, instance_workload, ordinal_workload  # type: ignore

# Peak DRAM bandwidth (GB/s) by device name, when the properties lack clock/bus width.
KNOWN_PEAK_GBS = {
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "RTX 3090": 936.0,
    "RTX 4090": 1008.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
}


def peak_bandwidth_gbs(device: int = 0) -> tuple[float | None, str]:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        # DDR: two transfers per clock.
        return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9, "device properties"
    for key, gbs in KNOWN_PEAK_GBS.items():
        if key in props.name:
            return gbs, f"table ({key})"
    return None, "unknown"


def cuda_time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sa_hdn_bytes(w, backward: bool) -> int:
    """Byte model of the CUDA sa_hdn kernels (docs/gpu_kernels.md), float32 inputs."""
    n = w.pred.numel()
    levels = 1 + (w.instances.shape[1] if w.instances is not None else 0)
    m = levels * n
    id_bytes = w.instances.element_size() * w.instances.numel() if w.instances is not None else 0
    # keys: target + valid + ids read, 12 B per membership written; sort ~ 4 passes of
    # 2 x 12 B; RLE + scans ~ 40 B; gather 12 + 8 + 4 (seg) + 8 (keys) per membership;
    # 3 histogram passes, MAD and sums: 5 x 8 B.
    fwd = n * 5 + id_bytes + m * (12 + 4 * 24 + 40 + 32 + 5 * 8)
    bwd = n * (4 + 4 + 4) + m * 4  # pred, target, grad out, seg per level
    return fwd + (bwd if backward else 0)


def ordinal_bytes(w, backward: bool) -> int:
    pairs = w.labels.numel()
    fwd = pairs * (32 + 8 + 8)  # pairs, labels, two gathered pred values (32 B sectors)
    bwd = w.pred.numel() * 4 + pairs * (32 + 8 + 8 + 64)  # zero fill, gathers, atomics
    return fwd + (bwd if backward else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--reference-repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to measure", file=sys.stderr)
        sys.exit(0)
    dev = "cuda"
    backends = westar_ops.available_backends(dev)
    peak, peak_src = peak_bandwidth_gbs()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; peak DRAM bandwidth: {peak or float('nan'):.0f} GB/s ({peak_src})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; backends: {backends}")

    sa_workloads = [instance_workload(device=dev), grid_workload(device=dev)]
    ord_workload = ordinal_workload(device=dev)
    rows = []

    def run_case(label, make_loss, nbytes_fwd, nbytes_bwd, pred, repeats):
        def fwd():
            with torch.no_grad():
                make_loss(pred)

        p = pred.clone().requires_grad_(True)

        def fwd_bwd():
            loss = make_loss(p)
            torch.autograd.grad(loss, p)

        for phase, fn, nbytes in (("fwd", fwd, nbytes_fwd), ("fwd+bwd", fwd_bwd, nbytes_bwd)):
            ms = cuda_time_ms(fn, repeats)
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append((label, phase, ms, gbs, 100 * gbs / peak if peak else float("nan")))

    for w in sa_workloads:
        for backend in [b for b in ("cuda", "triton") if b in backends] + ["reference"]:

            def make_loss(p, w=w, backend=backend):
                a = (p, w.target, w.instances, w.valid)
                if backend == "reference":
                    return reference.sa_hdn_loss(*a)
                return ops.sa_hdn_loss(*a, backend=backend)

            reps = args.reference_repeats if backend == "reference" else args.repeats
            run_case(f"sa_hdn {w.name} [{backend}]", make_loss, sa_hdn_bytes(w, False),
                     sa_hdn_bytes(w, True), w.pred, reps)  # fmt: skip

    w = ord_workload
    for backend in [b for b in ("cuda", "triton") if b in backends] + ["reference"]:

        def make_loss(p, backend=backend):
            if backend == "reference":
                return reference.ordinal_ranking_loss(p, w.pairs, w.labels)
            return ops.ordinal_ranking_loss(p, w.pairs, w.labels, backend=backend)

        run_case(f"ordinal {w.name} [{backend}]", make_loss, ordinal_bytes(w, False),
                 ordinal_bytes(w, True), w.pred, args.repeats)  # fmt: skip

    header = f"{'case':58s} {'phase':8s} {'median ms':>10s} {'GB/s':>8s} {'% peak':>7s}"
    print(header)
    print("-" * len(header))
    for label, phase, ms, gbs, pct in rows:
        print(f"{label:58s} {phase:8s} {ms:10.3f} {gbs:8.1f} {pct:7.1f}")
    print("GB/s: byte model of the CUDA kernels (docs/gpu_kernels.md) / median time, the same")
    print("model for every backend, so it compares speed, not each backend's own traffic.")
    if args.csv:
        with args.csv.open("w") as f:
            f.write("device,case,phase,median_ms,model_gbs,percent_peak\n")
            for label, phase, ms, gbs, pct in rows:
                f.write(f"{name},{label},{phase},{ms:.4f},{gbs:.2f},{pct:.2f}\n")


if __name__ == "__main__":
    main()
