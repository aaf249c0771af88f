"""Overhead of the scale-free weak term (normalized_ordinal_ranking_loss) on the CPU.

    python benchmarks/normalized_ordinal.py [--reps 21] [--threads N] [--sizes 126 518]

For B = 4 images of each size (float32, 10 % invalid pixels, SA-HDN on the global context
plus a 4x4 / 2x2 grid, 100 ordinal pairs per image), the median wall time of one forward +
backward (through autograd, on a fresh leaf each time) of:

- raw ordinal      ordinal_ranking_loss on the raw prediction
- norm ordinal     normalized_ordinal_ranking_loss with stats=None (torch computes the
                   per-image median / MAD: one more pass over the image)
- sa_hdn           sa_hdn_loss alone
- sa_hdn + raw     the old objective's two terms, one backward
- sa_hdn + norm    sa_hdn_loss(return_stats=True) + normalized_ordinal_ranking_loss(stats=...)

The cases run interleaved (one of each per round), so all see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a checkout built in place

import westar_ops  # noqa: E402

PAIRS = 100


def workload(size: int, batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, size, size, generator=gen) * 3 + 0.5
    target = torch.rand(batch, size, size, generator=gen) * 3 + 0.5
    valid = torch.rand(batch, size, size, generator=gen) > 0.1
    grid = westar_ops.grid_instances(batch, size, size, (4, 2))
    ys = torch.randint(0, size, (batch, PAIRS, 2), generator=gen)
    xs = torch.randint(0, size, (batch, PAIRS, 2), generator=gen)
    labels = torch.randint(-1, 2, (batch, PAIRS), generator=gen)
    return pred, target, valid, grid, torch.stack([ys, xs], -1), labels


def cases(pred, target, valid, grid, pairs, labels):
    def raw(x):
        return westar_ops.ordinal_ranking_loss(x, pairs, labels)

    def norm(x):
        return westar_ops.normalized_ordinal_ranking_loss(x, pairs, labels, valid=valid)

    def sa_hdn(x):
        return westar_ops.sa_hdn_loss(x, target, grid, valid)

    def sa_hdn_raw(x):
        return sa_hdn(x) + raw(x)

    def sa_hdn_norm(x):
        loss, stats = westar_ops.sa_hdn_loss(x, target, grid, valid, return_stats=True)
        return loss + westar_ops.normalized_ordinal_ranking_loss(x, pairs, labels, stats=stats)

    return {
        "raw ordinal": raw,
        "norm ordinal (stats=None)": norm,
        "sa_hdn": sa_hdn,
        "sa_hdn + raw ordinal": sa_hdn_raw,
        "sa_hdn + norm ordinal (stats reused)": sa_hdn_norm,
    }


def step(fn, pred) -> float:
    x = pred.clone().requires_grad_(True)
    start = time.perf_counter()
    fn(x).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sizes", type=int, nargs="+", default=[126, 518])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; B=4, {PAIRS} pairs per image, "
          f"medians of {args.reps} forward+backward runs (ms)\n")  # fmt: skip
    results = {}
    for size in args.sizes:
        inputs = workload(size)
        fns = cases(*inputs)
        for fn in fns.values():  # warm-up
            step(fn, inputs[0])
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                times[name].append(step(fn, inputs[0]))
        results[size] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    names = list(results[args.sizes[0]])
    print("| case | " + " | ".join(f"{s}x{s}" for s in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[s][name]:.2f}" for s in args.sizes) + " |")
    print("| overhead of norm over raw, with sa_hdn | " + " | ".join(
        f"{results[s]['sa_hdn + norm ordinal (stats reused)'] - results[s]['sa_hdn + raw ordinal']:+.2f}"
        for s in args.sizes) + " |")  # fmt: skip
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
