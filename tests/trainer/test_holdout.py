"""Held-out ordinal pairs: the split, the accuracy, and what `westar train` logs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.trainer.helpers import train_config
from westar.data import AdaptationDataset, load_pairs
from westar.holdout import HeldOutPairs, pair_accuracy, split_pairs


def _random_pairs(rng, n_images=5, h=20, w=30):
    images = {}
    for i in range(n_images):
        pairs = []
        for _ in range(int(rng.integers(0, 12))):
            a = [int(rng.integers(0, w)), int(rng.integers(0, h))]
            b = [int(rng.integers(0, w)), int(rng.integers(0, h))]
            pairs.append(
                {"a": a, "b": b, "relation": str(rng.choice(["farther", "closer", "equal"]))}
            )
        images[f"im{i}"] = {"width": w, "height": h, "pairs": pairs}
    return images


def _key(p):
    return (tuple(p["a"]), tuple(p["b"]), p["relation"])


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_split_is_a_partition_of_each_image(fraction):
    rng = np.random.default_rng(1)
    pairs = _random_pairs(rng)
    train, held = split_pairs(pairs, fraction, seed=3)
    assert set(train) == set(held) == set(pairs)
    for stem, entry in pairs.items():
        kept, out = train[stem]["pairs"], held[stem]["pairs"]
        assert sorted(map(_key, kept + out)) == sorted(map(_key, entry["pairs"]))
        assert len(out) == int(round(fraction * len(entry["pairs"])))
        assert train[stem]["width"] == entry["width"] and held[stem]["height"] == entry["height"]


def test_split_depends_on_seed_and_image_only():
    pairs = _random_pairs(np.random.default_rng(2), n_images=6)
    _, held_a = split_pairs(pairs, 0.5, seed=0)
    _, held_b = split_pairs({k: pairs[k] for k in list(pairs)[:3]}, 0.5, seed=0)
    for stem in held_b:  # dropping other images does not change an image's split
        assert held_a[stem] == held_b[stem]
    _, held_c = split_pairs(pairs, 0.5, seed=1)
    assert any(held_a[s] != held_c[s] for s in pairs)  # another seed, another split


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="holdout"):
        split_pairs({}, fraction, seed=0)


@pytest.mark.parametrize("output_space", ["disparity", "depth"])
def test_pair_accuracy_matches_a_vectorized_count(output_space):
    rng = np.random.default_rng(4)
    h, w = 17, 23
    pred = rng.normal(size=(h, w)).astype(np.float32)
    pairs = [p for e in _random_pairs(rng, n_images=6, h=h, w=w).values() for p in e["pairs"]]
    assert len(pairs) > 10
    right, counted = pair_accuracy(pred, pairs, output_space)
    ordered = [p for p in pairs if p["relation"] != "equal"]
    a = np.array([p["a"] for p in ordered], dtype=np.int64).reshape(-1, 2)
    b = np.array([p["b"] for p in ordered], dtype=np.int64).reshape(-1, 2)
    farther = np.array([p["relation"] == "farther" for p in ordered])
    a_larger = pred[a[:, 1], a[:, 0]] > pred[b[:, 1], b[:, 0]]
    # a farther: larger depth / smaller disparity
    expected = (a_larger == farther) if output_space == "depth" else (a_larger != farther)
    assert counted == len(ordered)
    assert right == int(expected.sum())


def test_trainer_logs_heldout_accuracy_and_trains_without_those_pairs(
    tiny_model, dataset_root, tmp_path
):
    from westar.train import Trainer

    cfg = train_config(
        tiny_model, dataset_root, tmp_path / "run", holdout_pairs=0.3, holdout_every=3, steps=4
    )
    trainer = Trainer(cfg)
    everything = load_pairs(dataset_root / "pairs.json")
    _, held = split_pairs(everything, 0.3, cfg.seed)
    used = sum(len(s.pairs["pairs"]) for s in trainer.dataset.samples if s.pairs)
    n_held = sum(len(e["pairs"]) for e in held.values())
    assert n_held > 0
    assert used == sum(len(e["pairs"]) for e in everything.values()) - n_held
    trained = {(s.stem, _key(p)) for s in trainer.dataset.samples for p in s.pairs["pairs"]}
    assert not trained & {(stem, _key(p)) for stem, e in held.items() for p in e["pairs"]}

    trainer.fit()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    held_rows = {int(r["step"]): float(r["heldout_acc"]) for r in rows if r["heldout_acc"]}
    assert sorted(held_rows) == [0, 3, 4]  # the source, every 3 steps, the end
    assert held_rows[0] == trainer.initial_heldout_acc

    # the logged number is the accuracy of the final student on exactly the held-out pairs
    images = {s.stem: s.image for s in trainer.dataset.samples}
    check = HeldOutPairs(images, held, cfg.output_space)
    acc = check.accuracy(trainer.unwrapped, trainer.depth, min(cfg.image_size), "cpu")
    assert acc == pytest.approx(held_rows[4])


def test_holdout_needs_a_pairs_file(tiny_model, dataset_root, tmp_path):
    from westar.data import DataError
    from westar.train import Trainer

    cfg = train_config(
        tiny_model, dataset_root, tmp_path / "run", holdout_pairs=0.2, lambda_w=0.0,
        pairs_file=str(tmp_path / "missing.json"),
    )  # fmt: skip
    with pytest.raises(DataError, match="missing.json"):
        Trainer(cfg)


def test_holdout_that_keeps_no_pair_is_refused(tiny_model, tmp_path):
    from tests.trainer.helpers import make_dataset
    from westar.data import DataError
    from westar.train import Trainer

    root = make_dataset(tmp_path / "ds", n=2, size=(56, 56))
    doc = json.loads((root / "pairs.json").read_text())
    for entry in doc["images"].values():
        entry["pairs"] = entry["pairs"][:1]  # round(0.2 * 1) = 0 held out
    (root / "pairs.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="holds out no ordered pair"):
        Trainer(train_config(tiny_model, root, tmp_path / "run", holdout_pairs=0.2))


@pytest.mark.parametrize("field, value", [("holdout_pairs", 1.0), ("holdout_pairs", -0.5),
                                          ("holdout_every", 0)])  # fmt: skip
def test_config_checks_holdout_fields(field, value, tmp_path):
    from westar.config import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_dataset_uses_given_pairs_instead_of_the_file(dataset_root):
    everything = load_pairs(dataset_root / "pairs.json")
    none = {stem: {**e, "pairs": []} for stem, e in everything.items()}
    ds = AdaptationDataset(
        dataset_root / "images", (56, 56), pairs_file=dataset_root / "pairs.json", pairs=none
    )
    assert all(len(ds[i]["labels"]) == 0 for i in range(len(ds)))
    full = AdaptationDataset(
        dataset_root / "images", (56, 56), pairs_file=dataset_root / "pairs.json"
    )
    assert sum(len(full[i]["labels"]) for i in range(len(full))) > 0
    torch.testing.assert_close(ds[0]["image"], full[0]["image"])
