"""Print a markdown table comparing the CPU kernels with the plain-PyTorch reference.

    python benchmarks/cpu_table.py [--reps 15] [--ref-reps 5] [--threads N]

For every workload of ``benchmarks/workloads.py``: the median wall time of forward +
backward for the C++ kernel and for ``westar_ops.reference``, measured in one run with
the two interleaved (kernel, reference, kernel, ...) so that both see the same machine
load; their ratio; and the peak extra memory of one forward + backward, measured in a
fresh subprocess as the rise of the peak resident set size (VmHWM in /proc/self/status,
reset through /proc/self/clear_refs) over the resident size with the inputs built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # a checkout built in place, when not installed

import workloads as W  # noqa: E402

import westar_ops  # noqa: E402
from westar_ops import reference  # noqa: E402

SA_HDN = {
    "instances64": "SA-HDN, 64 uneven instances + global",
    "instances64-sparse": "SA-HDN, same, ids random in [1, 2^31-1]",
    "grid": "classic HDN grid (4x4 + 2x2 + global = 21 contexts)",
}


def make_sa_hdn(name: str):
    if name == "instances64":
        return W.instance_workload()
    if name == "instances64-sparse":
        return W.instance_workload(sparse_ids=True)
    if name == "grid":
        return W.grid_workload()
    raise ValueError(name)


def sa_hdn_step(impl: str, wl) -> None:
    fn = westar_ops.sa_hdn_loss if impl == "kernel" else reference.sa_hdn_loss
    pred = wl.pred.clone().requires_grad_()
    fn(pred, wl.target, wl.instances, wl.valid).backward()


def ordinal_step(impl: str, wl) -> None:
    fn = westar_ops.ordinal_ranking_loss if impl == "kernel" else reference.ordinal_ranking_loss
    pred = wl.pred.clone().requires_grad_()
    fn(pred, wl.pairs, wl.labels).backward()


def make(name: str):
    if name == "ordinal":
        return W.ordinal_workload(), ordinal_step
    return make_sa_hdn(name), sa_hdn_step


def input_bytes(wl) -> int:
    tensors = [
        getattr(wl, f, None) for f in ("pred", "target", "instances", "valid", "pairs", "labels")
    ]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, impl: str) -> dict:
    """Runs in a fresh process: peak RSS rise of one forward + backward."""
    wl, step = make(name)
    # Warm the code paths on a tiny copy so that lazy initialisation is not counted.
    if name == "ordinal":
        small = W.ordinal_workload(1, 16, 16, 8)
    else:
        small = W.grid_workload(1, 16, 16)
    step(impl, small)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    step(impl, wl)
    peak = _status_kib("VmHWM")
    return {"extra_bytes": (peak - base) * 1024, "input_bytes": input_bytes(wl)}


def peak_memory(name: str, impl: str, threads: int) -> dict | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, __file__, "--child", name, impl, "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, OSError, ValueError):
        return None


def time_pair(name: str, reps: int, ref_reps: int) -> tuple[float, float]:
    wl, step = make(name)
    step("kernel", wl)  # warm-up
    step("reference", wl)
    kernel, ref = [], []
    for i in range(max(reps, ref_reps)):
        if i < reps:
            t = time.perf_counter()
            step("kernel", wl)
            kernel.append(time.perf_counter() - t)
        if i < ref_reps:
            t = time.perf_counter()
            step("reference", wl)
            ref.append(time.perf_counter() - t)
    return statistics.median(kernel), statistics.median(ref)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="kernel repetitions")
    parser.add_argument("--ref-reps", type=int, default=5, help="reference repetitions")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(peak_memory_child(*args.child)))
        return

    names = [*SA_HDN, "ordinal"]
    load_before = os.getloadavg()
    rows = []
    for name in names:
        k, r = time_pair(name, args.reps, args.ref_reps)
        mem_k = None if args.no_memory else peak_memory(name, "kernel", args.threads)
        mem_r = None if args.no_memory else peak_memory(name, "reference", args.threads)
        rows.append((name, k, r, mem_k, mem_r))

    load_after = os.getloadavg()
    info = westar_ops.build_info()
    print(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()}")
    print(
        f"- torch {torch.__version__}, {args.threads} intra-op threads; "
        f"python {platform.python_version()}; westar_ops {westar_ops.__version__} "
        f"(CPU loops: {info['cpu_isa']}, {info['cpu_threading']})"
    )
    print(
        f"- load average (1 min) before / after the timing: {load_before[0]:.2f} / "
        f"{load_after[0]:.2f} (other work on the machine distorts both sides, the "
        "multi-threaded reference most)"
    )
    print(
        "- workloads: B=4, 518x518, float32, 10% invalid pixels (benchmarks/workloads.py, "
        "seed 0); ordinal: 4096 pairs per image, ~10% ignored"
    )
    print(
        f"- medians of {args.reps} (kernel) and {args.ref_reps} (reference) forward+backward runs"
    )
    print()
    print(
        "| workload | kernel (ms) | reference (ms) | speedup | kernel peak extra MiB "
        "| reference peak extra MiB | inputs MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, k, r, mem_k, mem_r in rows:
        desc = SA_HDN.get(name, "ordinal ranking loss (margin)")
        inputs = (mem_k or mem_r or {}).get("input_bytes")
        print(
            f"| {desc} | {k * 1e3:.2f} | {r * 1e3:.1f} | {r / k:.1f}x "
            f"| {fmt_mb(mem_k and mem_k['extra_bytes'])} "
            f"| {fmt_mb(mem_r and mem_r['extra_bytes'])} | {fmt_mb(inputs)} |"
        )


if __name__ == "__main__":
    main()
