"""One-command GPU benchmark of the westar_ops losses: Triton, CUDA C++ and the
plain-PyTorch reference, forward and forward+backward, timed with CUDA events.

    python benchmarks/gpu_bench.py [--repeats 50] [--csv out.csv]
    python benchmarks/gpu_bench.py --estimate      # no GPU needed: the byte model only

Workloads (benchmarks/workloads.py, the CPU benchmark's): B=4, 518x518, float32,
64 uneven instances + global with 10% invalid pixels; classic HDN grid 4x4 + 2x2 + global;
the ordinal loss with 4096 pairs per image. Reports the median time and the achieved
bandwidth of each backend's byte model (bytes its kernels move through DRAM, counted
from the code: docs/gpu_kernels.md, docs/triton_kernels.md) against the device's peak
memory bandwidth. ``--estimate`` prints the byte model and the time it implies at the
peak bandwidth of a few GPUs (a lower bound, before launch latency) as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
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


@dataclass
class SaHdnSize:
    """What the byte models need to know about one sa_hdn workload."""

    pixels: int  # N = B*H*W
    levels: int  # C = levels of instances + the global one
    planes: int  # C*B
    elem: int  # bytes of one pred/target element
    id_bytes: int  # bytes of the ids of one pixel, all levels
    has_valid: bool
    small: int  # memberships in contexts of <= 1024 members (one warp / one program)
    large: int  # memberships in larger contexts (tiled radix select)
    acc: int  # bytes of the accumulation dtype (4, or 8 for float64)

    @property
    def memberships(self) -> int:
        return self.levels * self.pixels

    @property
    def input_bytes(self) -> int:
        """One read of the op's inputs: pred, target, valid, ids."""
        return self.pixels * (2 * self.elem + int(self.has_valid) + self.id_bytes)


def sa_hdn_size(w) -> SaHdnSize:
    """Sizes of a workload; the context sizes come from the CPU op (same contexts)."""
    pred = w.pred.cpu()
    levels = 1 + (w.instances.shape[1] if w.instances is not None else 0)
    out = torch.ops.westar_ops.sa_hdn_forward(
        pred, w.target.cpu(),
        None if w.instances is None else w.instances.cpu(),
        None if w.valid is None else w.valid.cpu(),
        True, 1e-6, 1, 2,
    )  # fmt: skip
    counts = out[2][:, 7].to(torch.int64)
    small = int(counts[counts <= 1024].sum())
    return SaHdnSize(
        pixels=pred.numel(),
        levels=levels,
        planes=levels * pred.shape[0],
        elem=pred.element_size(),
        id_bytes=0 if w.instances is None else w.instances.shape[1] * w.instances.element_size(),
        has_valid=w.valid is not None,
        small=small,
        large=int(counts.sum()) - small,
        acc=8 if pred.dtype == torch.float64 else 4,
    )


def _key_reads(s: SaHdnSize) -> int:
    """The keys kernel reads target, valid and the ids of every level once per pixel."""
    return s.pixels * (s.elem + int(s.has_valid) + s.id_bytes)


def cuda_sa_hdn_bytes(s: SaHdnSize) -> tuple[int, int]:
    """(forward, backward) DRAM bytes of the CUDA kernels (csrc/cuda/sa_hdn_cuda.cu)."""
    m = s.memberships
    plane_bits = max(1, s.planes.bit_length())  # planes < 2^plane_bits (sentinel = planes)
    sort_passes = -(-(31 + plane_bits) // 8)  # CUB onesweep, 8-bit digits, 35 bits: 5
    key = s.acc  # ordered keys: uint32, or uint64 for float64
    digits = key
    fwd = (
        4 * m  # seg = -1
        + _key_reads(s) + 12 * m  # keys_kernel: 8 B key + 4 B pixel written per membership
        + m * (8 + 24 * sort_passes)  # radix sort of (key, pixel): histogram + passes
        + 8 * m  # run-length encoding reads the sorted keys
        + 72 * (m + 1)  # run_flags (3 x 8 B written) + 3 exclusive scans (16 B each)
        + s.small * (4 + 2 * s.elem + 4)  # small_kernel: pixel, pred/target gather, seg
        + s.large * (4 + 2 * s.elem + 2 * key + 4)  # big_pass0: gather, keys written, seg
        + s.large * 2 * key * (digits - 1)  # big_hist_kernel, digits 1..D-1
        + s.large * 2 * key * 2  # big_mad_kernel, big_sums_kernel
    )
    bwd = s.pixels * (2 * s.elem + 4 * s.levels + s.elem)  # pred, target, seg per level, out
    return fwd, bwd


# torch ops of the Triton grouping that run over all M memberships (westar_ops/triton/
# sa_hdn.py, _forward step 2), bytes read + written per membership, counted from the code
# (and checked with a TorchDispatchMode byte counter on a small case): ones 1, != 17,
# is_start copy 3, cumsum 9, - 1 16, arange 8, searchsorted 24, counts 24, clamp 16,
# run_key gather 24, keep (>=, !=, &) 21, keep_cs 9, big_run (>, &) 12, big_cs 9,
# ntiles (+, //, where) 49, two size classes (>, <=, &, &, cumsum) 2 x 33, sum 8,
# k_of_run 16.
TRITON_GROUPING_OPS_BYTES = 348
# torch.sort(int64 keys, stable) = CUB radix sort of 64-bit keys with int64 indices as
# values: 8 digit passes reading and writing 16 B, plus the index iota and the histogram.
TRITON_SORT_BYTES = 8 * 32 + 8 + 8


def triton_sa_hdn_bytes(s: SaHdnSize) -> tuple[int, int]:
    """(forward, backward) DRAM bytes of the Triton path (westar_ops/triton/sa_hdn.py)."""
    m = s.memberships
    digits = s.acc  # 8-bit digits of the 32- (64-) bit ordered keys
    fwd = (
        4 * m  # seg = -1 (torch.full)
        + _key_reads(s) + 8 * m  # _keys_kernel: one int64 key per membership
        + TRITON_SORT_BYTES * m
        + TRITON_GROUPING_OPS_BYTES * m
        + s.small * (8 + 2 * s.elem + 4)  # _small_kernel: order, pred/target gather, seg
        + s.large * (8 + 2 * s.elem + 2 * s.acc + 4)  # pass 0: gather, sp/sq written, seg
        + s.large * 2 * s.acc * (digits - 1)  # passes 1..D-1 (the last one also the MAD)
        + s.large * 2 * s.acc  # _big_sums_kernel
    )
    bwd = s.pixels * (2 * s.elem + 4 * s.levels + s.elem)
    return fwd, bwd


def ordinal_bytes(w) -> tuple[int, int]:
    """(forward, backward) bytes of the ordinal kernels (both backends, default mode):
    labels 8 B and pairs 32 B per pair, two gathered pred values (L2-resident for
    518x518); the backward zero-fills the gradient, counts the used pairs again and
    adds with atomics (read-modify-write of 2 x 4 B)."""
    pairs = w.labels.numel()
    elem = w.pred.element_size()
    fwd = pairs * (8 + 32 + 2 * elem)
    bwd = w.pred.numel() * 4 + pairs * (8 + 32 + 2 * elem) * 2 + pairs * 16
    return fwd, bwd


SA_HDN_MODELS = {"cuda": cuda_sa_hdn_bytes, "triton": triton_sa_hdn_bytes}
# Peak DRAM bandwidth used for the estimate table (GB/s).
ESTIMATE_GPUS = (("RTX 3090", 936.0), ("RTX 4090", 1008.0), ("H100 SXM", 3350.0))


def estimate() -> None:
    """Byte model of every backend for the benchmark workloads, and the time it implies at
    peak bandwidth (a lower bound, before launch latency and the host sync). No GPU."""
    rows = []
    for w in (instance_workload(), grid_workload()):
        s = sa_hdn_size(w)
        for backend, model in SA_HDN_MODELS.items():
            fwd, bwd = model(s)
            rows.append((w.name, s, backend, fwd, bwd))
    print(f"torch {torch.__version__}; byte model of benchmarks/gpu_bench.py (no GPU used)")
    gpus = " | ".join(f"fwd / bwd at {n} ({g:.0f} GB/s)" for n, g in ESTIMATE_GPUS)
    print(f"| workload | memberships (small / large) | backend | fwd MB | fwd / input bytes "
          f"| bwd MB | {gpus} |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(ESTIMATE_GPUS))
    for name, s, backend, fwd, bwd in rows:
        bounds = " | ".join(
            f"{fwd / (g * 1e9) * 1e3:.2f} ms / {bwd / (g * 1e9) * 1e6:.0f} us"
            for _, g in ESTIMATE_GPUS
        )
        print(
            f"| {name} | {s.memberships / 1e6:.2f} M ({s.small / 1e6:.2f} / {s.large / 1e6:.2f}) "
            f"| {backend} | {fwd / 1e6:.0f} | {fwd / s.input_bytes:.0f}x | {bwd / 1e6:.1f} "
            f"| {bounds} |"
        )
    w = ordinal_workload()
    fwd, bwd = ordinal_bytes(w)
    print(f"ordinal {w.name}: fwd {fwd / 1e6:.2f} MB, bwd {bwd / 1e6:.2f} MB (both backends; "
          "launch-bound: 2 launches forward, 3 backward)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--reference-repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument(
        "--estimate", action="store_true", help="print the byte model only (no GPU needed)"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="time under torch.use_deterministic_algorithms(True)",
    )
    args = parser.parse_args()
    if args.estimate:
        estimate()
        return
    if not torch.cuda.is_available():
        print(
            "gpu_bench: no CUDA device; nothing to measure (--estimate prints the byte model)",
            file=sys.stderr,
        )
        sys.exit(0)
    torch.use_deterministic_algorithms(args.deterministic)
    dev = "cuda"
    backends = westar_ops.available_backends(dev)
    peak, peak_src = peak_bandwidth_gbs()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; peak DRAM bandwidth: {peak or float('nan'):.0f} GB/s ({peak_src})")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; backends: {backends}; "
        f"auto -> {ops.resolve_backend('auto', torch.device(dev))}; "
        f"deterministic: {args.deterministic}"
    )

    sa_workloads = [instance_workload(device=dev), grid_workload(device=dev)]
    ord_workload = ordinal_workload(device=dev)
    rows = []

    def run_case(label, make_loss, nbytes, pred, repeats):
        """nbytes: (forward, backward) of the backend's byte model, or None."""

        def fwd():
            with torch.no_grad():
                make_loss(pred)

        p = pred.clone().requires_grad_(True)

        def fwd_bwd():
            loss = make_loss(p)
            torch.autograd.grad(loss, p)

        phases = (("fwd", fwd), ("fwd+bwd", fwd_bwd))
        for i, (phase, fn) in enumerate(phases):
            ms = cuda_time_ms(fn, repeats)
            if nbytes is None:
                gbs = float("nan")
            else:
                gbs = (nbytes[0] + (nbytes[1] if i == 1 else 0)) / (ms * 1e-3) / 1e9
            pct = 100 * gbs / peak if peak else float("nan")
            rows.append((label, phase, ms, gbs, pct))

    for w in sa_workloads:
        size = sa_hdn_size(w)
        for backend in [b for b in ("cuda", "triton") if b in backends] + ["reference"]:

            def make_loss(p, w=w, backend=backend):
                a = (p, w.target, w.instances, w.valid)
                if backend == "reference":
                    return reference.sa_hdn_loss(*a)
                return ops.sa_hdn_loss(*a, backend=backend)

            reps = args.reference_repeats if backend == "reference" else args.repeats
            model = SA_HDN_MODELS.get(backend)
            nbytes = model(size) if model else None
            run_case(f"sa_hdn {w.name} [{backend}]", make_loss, nbytes, w.pred, reps)

    w = ord_workload
    for backend in [b for b in ("cuda", "triton") if b in backends] + ["reference"]:

        def make_loss(p, backend=backend):
            if backend == "reference":
                return reference.ordinal_ranking_loss(p, w.pairs, w.labels)
            return ops.ordinal_ranking_loss(p, w.pairs, w.labels, backend=backend)

        nbytes = None if backend == "reference" else ordinal_bytes(w)
        run_case(f"ordinal {w.name} [{backend}]", make_loss, nbytes, w.pred, args.repeats)

    header = f"{'case':58s} {'phase':8s} {'median ms':>10s} {'GB/s':>8s} {'% peak':>7s}"
    print(header)
    print("-" * len(header))
    for label, phase, ms, gbs, pct in rows:
        print(f"{label:58s} {phase:8s} {ms:10.3f} {gbs:8.1f} {pct:7.1f}")
    print("GB/s: the backend's own byte model (--estimate prints it) / median time; none for")
    print("the reference. Times include the public wrapper's checks (what users call).")
    if args.csv:
        with args.csv.open("w") as f:
            f.write("device,case,phase,median_ms,model_gbs,percent_peak,deterministic\n")
            for label, phase, ms, gbs, pct in rows:
                f.write(
                    f"{name},{label},{phase},{ms:.4f},{gbs:.2f},{pct:.2f},{args.deterministic}\n"
                )


if __name__ == "__main__":
    main()
