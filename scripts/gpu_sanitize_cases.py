"""Small cases of every GPU kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py [--backend cuda]

Runs forward and backward of ``sa_hdn_loss`` (instances with several levels, the grid,
an empty/degenerate case, deterministic mode) and ``ordinal_ranking_loss`` (margin and
logistic, deterministic mode) on tiny CUDA tensors with each GPU backend, so that the
sanitizer sees every kernel launch of both backends in seconds, not minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import westar_ops  # noqa: E402


def sa_hdn_cases(backend: str, gen: torch.Generator) -> None:
    dev = "cuda"
    for b, h, w, levels in [(2, 37, 29, 2), (1, 64, 64, 1), (3, 5, 7, 3)]:
        pred = torch.randn(b, 1, h, w, generator=gen).to(dev).requires_grad_(True)
        target = torch.randn(b, 1, h, w, generator=gen).to(dev)
        ids = torch.randint(0, 9, (b, levels, h, w), generator=gen).to(dev)
        valid = (torch.rand(b, h, w, generator=gen) > 0.2).to(dev)
        for stats_grad in ("none", "scale", "full"):
            loss = westar_ops.sa_hdn_loss(
                pred, target, ids, valid, backend=backend, stats_grad=stats_grad
            )
            loss.backward()
        grid = westar_ops.grid_instances(b, h, w, (4, 2)).to(dev)
        westar_ops.sa_hdn_loss(pred, target, grid, valid, backend=backend).backward()
    # Degenerate: nothing valid, and an empty batch.
    pred = torch.randn(1, 1, 8, 8, device=dev, requires_grad=True)
    westar_ops.sa_hdn_loss(
        pred,
        torch.randn(1, 1, 8, 8, device=dev),
        torch.zeros(1, 8, 8, dtype=torch.long, device=dev),
        torch.zeros(1, 8, 8, dtype=torch.bool, device=dev),
        backend=backend,
    ).backward()


def ordinal_cases(backend: str, gen: torch.Generator) -> None:
    dev = "cuda"
    b, h, w, p = 3, 33, 41, 50
    pred = torch.randn(b, 1, h, w, generator=gen).to(dev).requires_grad_(True)
    ys = torch.randint(0, h, (b, p, 2, 1), generator=gen)
    xs = torch.randint(0, w, (b, p, 2, 1), generator=gen)
    pairs = torch.cat([ys, xs], dim=-1).to(dev)
    labels = torch.randint(-1, 2, (b, p), generator=gen).to(dev)
    for kind in ("margin", "logistic"):
        westar_ops.ordinal_ranking_loss(pred, pairs, labels, kind=kind, backend=backend).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cuda", "triton", "both"], default="both")
    args = parser.parse_args()
    backends = ["cuda", "triton"] if args.backend == "both" else [args.backend]
    if "cuda" in backends and not westar_ops.build_info().get("with_cuda", False):
        print("gpu_sanitize_cases: extension built without CUDA kernels; cuda backend skipped")
        backends.remove("cuda")
    gen = torch.Generator().manual_seed(0)
    for backend in backends:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            sa_hdn_cases(backend, gen)
            ordinal_cases(backend, gen)
        torch.use_deterministic_algorithms(False)
        torch.cuda.synchronize()
        print(f"gpu_sanitize_cases: {backend} ok")


if __name__ == "__main__":
    main()
