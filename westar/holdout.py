"""Held-out ordinal pairs: how a user without ground-truth depth tells whether training helps.

`westar train --holdout-pairs F` keeps a fraction F of each image's pairs out of training
(`split_pairs`, a fixed function of the seed and the image's name) and measures, every
``--holdout-every`` steps and at the end, how many of them the student orders right
(`HeldOutPairs.accuracy`). The benchmark's recipe search reports how well this number
ranks recipes compared with the validation AbsRel that needs depth (docs/sweep.md).

Accuracy counts the pairs with an order ("farther" / "closer"): a pair is right when the
sign of ``pred[a] - pred[b]`` is the label's (`westar.data.relation_to_label`); "equal"
pairs are left out (an exact tie never happens on a float prediction).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from westar.data import read_image, relation_to_label

__all__ = ["split_pairs", "pair_accuracy", "HeldOutPairs"]


def _image_rng(seed: int, stem: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{stem}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def split_pairs(
    pairs: dict[str, dict[str, Any]], fraction: float, seed: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(train, held_out): each image's pairs split at random, ``round(fraction * n)`` held out.

    ``pairs`` is `westar.data.load_pairs`'s mapping {stem: {"width", "height", "pairs"}};
    both parts keep every image (with an empty list where nothing is left). The split of an
    image depends only on (seed, stem, its pairs), not on the other images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    train, held = {}, {}
    for stem, entry in pairs.items():
        items = list(entry["pairs"])
        n_held = int(round(fraction * len(items)))
        order = _image_rng(seed, stem).permutation(len(items))
        held_idx = set(order[:n_held].tolist())
        train[stem] = {**entry, "pairs": [p for i, p in enumerate(items) if i not in held_idx]}
        held[stem] = {**entry, "pairs": [p for i, p in enumerate(items) if i in held_idx]}
    return train, held


def pair_accuracy(
    pred: np.ndarray, pairs: list[dict[str, Any]], output_space: str = "disparity"
) -> tuple[int, int]:
    """(right, counted) over the ordered pairs of one image; ``pred`` is (H, W) at the
    image's own size, pair points are [x, y] pixels of that size."""
    right = counted = 0
    for pair in pairs:
        label = relation_to_label(pair["relation"], output_space)
        if label == 0:
            continue
        (xa, ya), (xb, yb) = pair["a"], pair["b"]
        diff = float(pred[int(ya), int(xa)]) - float(pred[int(yb), int(xb)])
        right += int(np.sign(diff) == label)
        counted += 1
    return right, counted


class HeldOutPairs:
    """The held-out pairs of a training set and the images they belong to.

    ``images`` maps stem -> image path; ``held`` is `split_pairs`'s second part. Images
    without held-out ordered pairs are not predicted.
    """

    def __init__(self, images: dict[str, Any], held: dict[str, dict[str, Any]], output_space: str):
        self.output_space = output_space
        self.items = [
            (images[stem], entry["pairs"])
            for stem, entry in sorted(held.items())
            if stem in images and any(p["relation"] != "equal" for p in entry["pairs"])
        ]

    @property
    def num_pairs(self) -> int:
        return sum(sum(p["relation"] != "equal" for p in pairs) for _, pairs in self.items)

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def accuracy(self, model, depth_model, size: int, device) -> float | None:
        """Fraction of held-out ordered pairs `model` orders right, predicting each image
        at ``size`` (its shorter side; `westar.evaluate`'s inference) and resizing the
        prediction back to the image; None when there are no such pairs."""
        from westar.evaluate import _predict_image
        from westar.model import eval_mode

        right = counted = 0
        with eval_mode(model):
            for path, pairs in self.items:
                pred = _predict_image(model, depth_model, read_image(path), size, device)
                r, c = pair_accuracy(pred, pairs, self.output_space)
                right, counted = right + r, counted + c
        return right / counted if counted else None
