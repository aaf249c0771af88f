"""The trainer's data: the run's dataset (checked up front), the batch order as a function
of (seed, step, rank), and the DataLoader that decodes and crops in worker processes."""

from __future__ import annotations

import os

import numpy as np
import torch

from westar.config import TrainConfig
from westar.data import AdaptationDataset, DataError, collate, load_pairs
from westar.holdout import HeldOutPairs, split_pairs

__all__ = [
    "StepBatchSampler",
    "build_dataset",
    "make_loader",
    "depth_target",
    "resolve_num_workers",
]


class StepBatchSampler:
    """Batches of (dataset index, crop seed) as a function of (seed, step, rank) only.

    The global batch of micro-step m is positions [m*G, (m+1)*G) of an endless stream of
    epochs, each a permutation seeded by (seed, epoch); G = batch_size * world_size and
    rank r takes its slice. With gradient accumulation, optimizer step t is micro-steps
    t*accum ... t*accum + accum - 1. Starting at any step needs no saved iterator state.
    The crop seed of each item is derived from (seed, micro-step, rank, slot).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, end: int, rank=0, world=1, accum=1
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.end, self.rank, self.world = start, end, rank, world
        self.accum = max(1, int(accum))
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def indices(self, micro_step: int) -> list[int]:
        g = self.batch_size * self.world
        first = micro_step * g + self.rank * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(first, first + self.batch_size)]

    def crop_seeds(self, micro_step: int) -> list[int]:
        seq = np.random.SeedSequence([self.seed, micro_step, self.rank, 0x63726F70])
        return [int(v) for v in seq.generate_state(self.batch_size, np.uint32)]

    def __iter__(self):
        for micro in range(self.start * self.accum, self.end * self.accum):
            yield list(zip(self.indices(micro), self.crop_seeds(micro)))

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum


def depth_target(depth: torch.Tensor, output_space: str = "disparity") -> torch.Tensor:
    """Ground-truth depth (B, H, W) in meters as the self-training target of
    pseudo_label="depth": disparity 1/depth (or depth itself for a depth-output model),
    NaN where the depth is invalid (0 or non-finite), which the loss leaves unused."""
    depth = depth.float()
    ok = torch.isfinite(depth) & (depth > 0)
    value = 1.0 / torch.where(ok, depth, torch.ones_like(depth))
    if output_space == "depth":
        value = depth
    return torch.where(ok, value, torch.full_like(depth, float("nan")))


def resolve_num_workers(requested: int) -> int:
    """-1 (auto): decode and resize in min(4, cores - 1) worker processes (0 on one core)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cores or 1) - 1))


def build_dataset(
    cfg: TrainConfig, patch_size: int
) -> tuple[AdaptationDataset, HeldOutPairs | None]:
    """The run's dataset, and its held-out pairs when cfg.holdout_pairs > 0. Each input the
    configuration needs (instance maps, pairs file, depth folder) is checked first, naming
    the missing folder or file and the flag that avoids it. `patch_size`: the model's
    (crops are multiples of it)."""
    heldout = None
    instances_dir = None
    if cfg.hdn == "instances" and cfg.lambda_st > 0:
        instances_dir = cfg.resolved_instances_dir()
        if not instances_dir.is_dir():
            raise DataError(
                instances_dir,
                "instance folder not found: make instance maps with `westar masks`, or "
                "train with --hdn grid (classic HDN) / --hdn global",
            )
    pairs_file = pairs = None
    if cfg.lambda_w > 0 or cfg.holdout_pairs > 0:
        pairs_file = cfg.resolved_pairs_file()
        if not pairs_file.is_file():
            raise DataError(
                pairs_file,
                "ordinal pairs file not found: make one with `westar pairs`, or train "
                "without weak labels (--ablation no_weak or --lambda-w 0)",
            )
    held = None
    if cfg.holdout_pairs > 0:
        pairs, held = split_pairs(load_pairs(pairs_file), cfg.holdout_pairs, cfg.seed)
        held_file = pairs_file
        if cfg.lambda_w == 0:  # held-out pairs measured, none trained on
            pairs_file = pairs = None
    depth_dir = None
    if cfg.pseudo_label == "depth":
        depth_dir = cfg.resolved_depth_dir()
        if not depth_dir.is_dir():
            raise DataError(depth_dir, "depth folder not found (--pseudo-label depth trains on it)")
    dataset = AdaptationDataset(
        cfg.resolved_images_dir(),
        cfg.image_size,
        instances_dir=instances_dir,
        pairs_file=pairs_file,
        depth_dir=depth_dir,
        output_space=cfg.output_space,
        skip_bad=cfg.skip_bad,
        patch_size=patch_size,
        crop="random",
        seed=cfg.seed,
        pairs=pairs,
    )
    if held is not None:  # the images the dataset checked (and kept, with --skip-bad)
        images = {s.stem: s.image for s in dataset.samples}
        heldout = HeldOutPairs(images, held, cfg.output_space)
        if heldout.num_pairs == 0:
            raise DataError(
                held_file,
                f"--holdout-pairs {cfg.holdout_pairs:g} holds out no ordered pair "
                "(too few pairs per image): raise it or use 0",
            )
    return dataset, heldout


def make_loader(
    dataset, cfg: TrainConfig, start: int, end: int, rank: int, world: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """Micro-batches of steps [start, end): cfg.grad_accum per step, rank's slice."""
    sampler = StepBatchSampler(
        len(dataset), cfg.batch_size, cfg.seed, start, end, rank, world, accum=cfg.grad_accum
    )
    workers = resolve_num_workers(cfg.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
