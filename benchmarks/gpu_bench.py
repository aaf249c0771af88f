"""GPU benchmark of the westar_ops losses that reports what the hardware sees (issue 19).

    python benchmarks/gpu_bench.py                     # every case, PASS/FAIL at the end
    python benchmarks/gpu_bench.py --quick             # the target cases only (~1 min)
    python benchmarks/gpu_bench.py --csv out.csv --repeats 50
    python benchmarks/gpu_bench.py --smoke             # tiny sizes on the CPU: checks the
                                                       # script itself, measures nothing

Per case and implementation, forward and forward+backward:
- median, p10 and p90 of the per-call time (CUDA events around each call, eager);
- the CUDA-graph replay time of forward+backward (the op's step captured once with
  ``torch.cuda.graph`` and replayed; "n/a" when capture fails, e.g. a host sync);
- launches per call (kernels and memsets the profiler sees on the device) and host syncs
  per call (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize and
  blocking cudaMemcpy calls the profiler sees on the host);
- time as a multiple of one read of the inputs at the device's peak DRAM bandwidth
  (pred, target, valid, ids; pred and pairs, labels for the ordinal loss);
- ratios against the baselines: the per-context loop reference (westar_ops.reference,
  what a researcher writes first), the vectorized PyTorch reference
  (westar_ops.reference_vectorized: sort and segment sums, no loop over contexts) and
  its torch.compile version.
At the end, PASS/FAIL against the issue's targets (B=4, 518x518, int64 ids, float32).
DRAM bytes are not measured here (the profiler cannot): run the target case under
``ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum`` for them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import westar_ops  # noqa: E402
from westar_ops import ops, reference, reference_vectorized  # noqa: E402

try:
    from benchmarks.workloads import instance_workload, ordinal_workload
except ImportError:  # pragma: no cover - run from another directory layout
    from workloads import instance_workload, ordinal_workload  # type: ignore

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
}

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")

# The targets (times in microseconds), for the case they name.
TARGETS = {
    ("sa_hdn", "fwd", "median"): 80.0,
    ("sa_hdn", "fwd+bwd", "median"): 150.0,
    ("sa_hdn", "fwd+bwd", "graph"): 100.0,
    ("ordinal", "fwd+bwd", "median"): 40.0,
    ("normalized", "fwd+bwd", "median"): 60.0,
}
MAX_LAUNCHES_SA_HDN_FWD = 12


def peak_bandwidth_gbs() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "no GPU"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9, "device properties"
    for key, gbs in KNOWN_PEAK_GBS.items():
        if key in props.name:
            return gbs, f"table ({key})"
    return None, "unknown"


# --------------------------------------------------------------------------- timing


def _synchronize(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, repeats: int, dev: str, warmup: int = 3) -> list[float]:
    """Per-call times in microseconds (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    _synchronize(dev)
    times = []
    for _ in range(repeats):
        if dev == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[0], statistics.median(times), q[-1]


def graph_replay_us(step, repeats: int, dev: str) -> float | None:
    """Median replay time of ``step`` captured in a CUDA graph; None if it cannot be
    captured (a host sync or another capture error) or without a GPU."""
    if dev != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
        print(f"    (CUDA graph capture failed: {type(err).__name__}: {str(err)[:120]})")
        torch.cuda.synchronize()
        return None
    return statistics.median(time_calls(graph.replay, repeats, dev))


def count_launches_and_syncs(fn, dev: str) -> tuple[float, float]:
    """Device operations (kernels + memsets) and host syncs of one call, from the
    profiler (averaged over 3 calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _synchronize(dev)
    calls = 3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _synchronize(dev)
    launches = syncs = 0
    for ev in prof.events():
        name = ev.name
        on_device = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_device and not name.startswith("Memcpy"):
            launches += 1  # kernels and Memset
        elif not on_device and (
            name in SYNC_CALLS or name == "cudaMemcpy" or name.startswith("cudaMemcpy2D")
        ):
            syncs += 1
    # The profiler's own final synchronize is one of them.
    syncs = max(syncs - (1 if dev == "cuda" else 0), 0)
    return launches / calls, syncs / calls


# ---------------------------------------------------------------------------- cases


@dataclass
class Impl:
    name: str  # "cuda", "triton", "loop ref", "vector ref", "compiled ref"
    loss: object  # callable(pred) -> loss
    repeats: int
    graph: bool = True


@dataclass
class Case:
    op: str  # "sa_hdn", "ordinal", "normalized"
    label: str
    pred: torch.Tensor
    input_bytes: int
    impls: list = field(default_factory=list)
    target: bool = False  # the case the targets name


@dataclass
class Row:
    case: Case
    impl: str
    phase: str
    p10: float
    median: float
    p90: float
    graph: float | None
    launches: float
    syncs: float


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def sa_hdn_cases(dev, quick, args) -> list[Case]:
    sizes = [(4, 518)] if quick else [(4, 518), (16, 518), (4, 1036), (16, 1036)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    id_dtypes = [torch.int64] if quick else [torch.int64, torch.int32]
    if args.smoke:
        sizes = [(2, 24)]
    cases = []
    for batch, size in sizes:
        for dtype in dtypes:
            for id_dtype in id_dtypes:
                w = instance_workload(batch, size, size, 64, dtype=dtype, device=dev)
                inst = w.instances.to(id_dtype)
                # Known to the caller: at most 1 + 64 contexts per image.
                cap = batch * 65
                label = f"sa_hdn B={batch} {size}px {str(dtype)[6:]} {str(id_dtype)[6:]}"
                case = Case("sa_hdn", label, w.pred, _nbytes(w.pred, w.target, w.valid, inst))
                case.target = (batch, size, dtype, id_dtype) == (
                    4, 518, torch.float32, torch.int64,
                )  # fmt: skip
                extra = (w.target, inst, w.valid)
                for backend in args.backends:
                    case.impls.append(Impl(backend, _sa_hdn(backend, extra, cap), args.repeats))
                _add_references(case, extra, args, batch * size * size <= 4 * 518 * 518)
                cases.append(case)
    return cases


def _sa_hdn(backend, extra, cap):
    def loss(p):
        return westar_ops.sa_hdn_loss(p, *extra, backend=backend, max_contexts=cap)

    return loss


def _add_references(case, extra, args, with_loop):
    vec = reference_vectorized.sa_hdn_loss
    case.impls.append(Impl("vector ref", lambda p: vec(p, *extra), args.ref_repeats))
    if not args.no_compile:
        compiled = torch.compile(vec, fullgraph=True, dynamic=False)
        case.impls.append(Impl("compiled ref", lambda p: compiled(p, *extra), args.ref_repeats))
    if with_loop:  # ~800 host syncs per call: only where it finishes in reasonable time
        loop = reference.sa_hdn_loss
        case.impls.append(Impl("loop ref", lambda p: loop(p, *extra), 2, graph=False))


def ordinal_cases(dev, quick, args) -> list[Case]:
    shapes = [(4, 4096)] if quick else [(4, 4096), (16, 16384)]
    if args.smoke:
        shapes = [(2, 64)]
    size = 24 if args.smoke else 518
    cases = []
    for batch, num_pairs in shapes:
        w = ordinal_workload(batch, size, size, num_pairs, device=dev)
        nb = _nbytes(w.pred, w.pairs, w.labels)
        target = (batch, num_pairs) == (4, 4096)
        case = Case("ordinal", f"ordinal {batch}x{num_pairs} pairs", w.pred, nb, target=target)
        for backend in args.backends:
            case.impls.append(Impl(backend, _ordinal(backend, w.pairs, w.labels), args.repeats))
        ref = reference.ordinal_ranking_loss
        case.impls.append(
            Impl("vector ref", lambda p, w=w, f=ref: f(p, w.pairs, w.labels), args.ref_repeats)
        )
        if not args.no_compile:
            comp = torch.compile(ref, fullgraph=True, dynamic=False)
            case.impls.append(
                Impl(
                    "compiled ref", lambda p, w=w, f=comp: f(p, w.pairs, w.labels), args.ref_repeats
                )
            )
        cases.append(case)
        # The trainer's default: normalized by the per-image median / MAD (no stats given).
        valid = torch.isfinite(w.pred)
        case_n = Case(
            "normalized",
            f"normalized ordinal {batch}x{num_pairs} pairs",
            w.pred,
            nb + _nbytes(valid),
            target=target,
        )
        for backend in args.backends:
            case_n.impls.append(
                Impl(backend, _normalized(backend, w.pairs, w.labels, valid), args.repeats)
            )
        nref = reference.normalized_ordinal_ranking_loss
        case_n.impls.append(
            Impl(
                "vector ref",
                lambda p, w=w, v=valid, f=nref: f(p, w.pairs, w.labels, valid=v),
                args.ref_repeats,
            )
        )
        cases.append(case_n)
    return cases


def _ordinal(backend, pairs, labels):
    def loss(p):
        return westar_ops.ordinal_ranking_loss(p, pairs, labels, backend=backend)

    return loss


def _normalized(backend, pairs, labels, valid):
    def loss(p):
        return westar_ops.normalized_ordinal_ranking_loss(
            p, pairs, labels, valid=valid, backend=backend
        )

    return loss


# ------------------------------------------------------------------------ measuring


def measure(case: Case, impl: Impl, dev: str) -> list[Row]:
    pred = case.pred

    def fwd():
        with torch.no_grad():
            impl.loss(pred)

    p = pred.clone().requires_grad_(True)

    def fwd_bwd():
        loss = impl.loss(p)
        torch.autograd.grad(loss, p)

    rows = []
    for phase, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        p10, med, p90 = quantiles(time_calls(fn, impl.repeats, dev))
        graph = graph_replay_us(fn, impl.repeats, dev) if impl.graph else None
        launches, syncs = count_launches_and_syncs(fn, dev)
        rows.append(Row(case, impl.name, phase, p10, med, p90, graph, launches, syncs))
    return rows


def one_read_us(case: Case, peak_gbs: float | None) -> float | None:
    if not peak_gbs:
        return None
    return case.input_bytes / (peak_gbs * 1e9) * 1e6


def verdicts(rows: list[Row], peak: float | None) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measured, detail) for the issue's targets."""
    out = []
    auto = ops.resolve_backend("auto", torch.device("cuda")) if torch.cuda.is_available() else ""

    def pick(op, impl, phase):
        for r in rows:
            if r.case.op == op and r.case.target and r.impl == impl and r.phase == phase:
                return r
        return None

    for (op, phase, stat), limit in TARGETS.items():
        r = pick(op, auto, phase)
        value = None if r is None else (r.median if stat == "median" else r.graph)
        name = f"{op} {phase} {'eager median' if stat == 'median' else 'graph replay'}"
        ok = None if value is None else value <= limit
        out.append((f"{name} <= {limit:.0f} us", ok, "n/a" if value is None else f"{value:.1f}"))
    r = pick("sa_hdn", auto, "fwd")
    ok = None if r is None else r.launches <= MAX_LAUNCHES_SA_HDN_FWD
    out.append((f"sa_hdn fwd <= {MAX_LAUNCHES_SA_HDN_FWD} launches", ok,
                "n/a" if r is None else f"{r.launches:.0f}"))  # fmt: skip
    ours = [r for r in rows if r.impl in ("cuda", "triton")]
    if ours:
        worst = max(r.syncs for r in ours)
        out.append(("0 host syncs per call (all ops, backends, phases)", worst == 0,
                    f"max {worst:.1f}"))  # fmt: skip
    for ref, factor in (("vector ref", 10.0), ("compiled ref", 1.0)):
        for phase in ("fwd", "fwd+bwd"):
            r, b = pick("sa_hdn", auto, phase), pick("sa_hdn", ref, phase)
            if r is None or b is None:
                out.append((f"sa_hdn {phase} >= {factor:g}x {ref}", None, "n/a"))
                continue
            ratio = b.median / r.median
            ok = ratio >= factor if factor > 1 else ratio > 1
            out.append((f"sa_hdn {phase} {'>=' if factor > 1 else '>'} {factor:g}x {ref}", ok,
                        f"{ratio:.1f}x"))  # fmt: skip
    out.append(("sa_hdn fwd <= 10x one read in DRAM bytes", None, "needs ncu (see docstring)"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ref-repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the target cases only")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    if args.smoke:
        dev = "cpu"
        args.backends = ["cpu"]
        args.repeats = args.ref_repeats = 2
        args.quick = True
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to measure (--smoke checks the script)")
        sys.exit(0)
    else:
        dev = "cuda"
        args.backends = [b for b in ("cuda", "triton") if b in ops.available_backends(dev)]
    peak, peak_src = peak_bandwidth_gbs()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke run)"
    print(f"device: {name}; peak DRAM bandwidth: {peak or float('nan'):.0f} GB/s ({peak_src})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; backends: {args.backends}")
    cases = sa_hdn_cases(dev, args.quick, args) + ordinal_cases(dev, args.quick, args)
    rows: list[Row] = []
    for case in cases:
        print(f"{case.label} (inputs {case.input_bytes / 1e6:.2f} MB)", flush=True)
        for impl in case.impls:
            with contextlib.suppress(KeyboardInterrupt):
                rows.extend(measure(case, impl, dev))

    header = (f"{'case':40s} {'impl':12s} {'phase':8s} {'median us':>10s} {'p10':>8s} "
              f"{'p90':>8s} {'graph us':>9s} {'launch':>7s} {'syncs':>6s} {'x read':>7s} "
              f"{'vs loop':>8s} {'vs vec':>7s} {'vs comp':>8s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    by_key = {(r.case.label, r.impl, r.phase): r for r in rows}
    for r in rows:
        read = one_read_us(r.case, peak)
        ratios = []
        for ref in ("loop ref", "vector ref", "compiled ref"):
            b = by_key.get((r.case.label, ref, r.phase))
            ratios.append(f"{b.median / r.median:.1f}x" if b else "-")
        graph = f"{r.graph:9.1f}" if r.graph is not None else f"{'n/a':>9s}"
        xread = f"{r.median / read:7.0f}" if read else f"{'-':>7s}"
        print(f"{r.case.label:40s} {r.impl:12s} {r.phase:8s} {r.median:10.1f} {r.p10:8.1f} "
              f"{r.p90:8.1f} {graph} {r.launches:7.1f} {r.syncs:6.1f} {xread} "
              f"{ratios[0]:>8s} {ratios[1]:>7s} {ratios[2]:>8s}")  # fmt: skip
    print("x read: median time / one read of the inputs at peak bandwidth. vs X: X's median")
    print("time / this row's (higher is faster). Times include the public wrapper.")
    print()
    print(f"targets ({name}; B=4, 518x518, int64 ids, float32; backend 'auto'):")
    failed = False
    for target, ok, detail in verdicts(rows, peak):
        word = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        failed |= ok is False
        print(f"  {word}  {target}: {detail}")
    if args.csv:
        with args.csv.open("w") as f:
            f.write("device,case,impl,phase,median_us,p10_us,p90_us,graph_us,launches,syncs\n")
            for r in rows:
                f.write(f"{name},{r.case.label},{r.impl},{r.phase},{r.median:.2f},{r.p10:.2f},"
                        f"{r.p90:.2f},{'' if r.graph is None else f'{r.graph:.2f}'},"
                        f"{r.launches:.1f},{r.syncs:.1f}\n")  # fmt: skip
    sys.exit(0 if not failed or args.smoke else 1)


if __name__ == "__main__":
    main()
