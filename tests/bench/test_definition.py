"""The benchmark's frozen definition: scene-seed blocks never meet each other, the
source's pretraining scenes, its evaluation scenes or the old demo's blocks."""

from __future__ import annotations

import pytest

from westar.bench import frozen as D


def _blocks() -> dict[str, range]:
    """Every block of scene seeds the benchmark may use, at its largest, and every range
    that belongs to someone else."""
    blocks = {
        f"{fam}/seed{seed}/{split}": D.scene_seeds(fam, split, seed, D.MAX_SPLIT_IMAGES)
        for fam in D.FAMILY_BASE
        for seed in range(D.MAX_SEED)
        for split in D.SPLITS
    }
    blocks["calibration"] = D.calibration_seeds(D.CALIBRATION_MAX)
    blocks["pretraining (shipped model, read from training.json)"] = D.pretraining_range()
    blocks.update(D.reserved_ranges())
    return blocks


def test_seed_blocks_are_pairwise_disjoint():
    blocks = _blocks()
    bound = blocks.pop("pretraining (bound)")
    pre = blocks["pretraining (shipped model, read from training.json)"]
    # the shipped model's pretraining scenes lie inside the documented bound
    assert bound.start <= pre.start and pre.stop <= bound.stop, (pre, bound)
    blocks["pretraining (bound)"] = bound
    del blocks["pretraining (shipped model, read from training.json)"]
    spans = sorted((r.start, r.stop, name) for name, r in blocks.items())
    for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
        assert stop <= start, f"{a} and {b} meet"
    # the splits the benchmark actually uses are far inside their blocks
    assert max(D.SPLIT_SIZES.values()) <= D.MAX_SPLIT_IMAGES
    assert D.CALIBRATION_IMAGES <= D.CALIBRATION_MAX
    assert set(D.SEEDS) <= set(range(D.MAX_SEED))


def test_seed_block_arguments_are_checked():
    with pytest.raises(ValueError, match="seed"):
        D.scene_seeds("room", "test", D.MAX_SEED, 1)
    with pytest.raises(ValueError, match="scenes per split"):
        D.scene_seeds("room", "test", 0, D.MAX_SPLIT_IMAGES + 1)
    with pytest.raises(ValueError, match="split"):
        D.scene_seeds("room", "calibration", 0, 1)


def test_pretraining_range_is_read_from_training_json(tmp_path):
    f = tmp_path / "training.json"
    f.write_text('{"steps": 100, "data": "westar.synth.scenes, clean, seeds from 1000, '
                 'pool 50, 3 new scenes per step"}')  # fmt: skip
    assert D.pretraining_range(f) == range(1000, 1000 + 50 + 300)
    f.write_text('{"steps": 100, "data": "something else"}')
    with pytest.raises(ValueError, match="training.json"):
        D.pretraining_range(f)


def test_domains_follow_the_corruption_suite():
    from westar.corrupt import CORRUPTIONS

    # a new corruption must be added here deliberately (it changes the benchmark)
    assert set(D.CALIBRATED_CORRUPTIONS) == set(CORRUPTIONS)
    assert set(D.CORRUPTION_DOMAINS) | set(D.EXCLUDED_CORRUPTIONS) == set(CORRUPTIONS)
    assert not set(D.CORRUPTION_DOMAINS) & set(D.EXCLUDED_CORRUPTIONS)
    assert D.DOMAINS[0] == "clean" and D.DOMAINS[-1] == "streets"
    assert set(D.SEVERITIES) == set(D.CORRUPTION_DOMAINS)
    assert all(1 <= s <= 5 for s in D.SEVERITIES.values())
    assert set(D.MAX_DEPTH) == set(D.DOMAINS) and D.MAX_DEPTH["streets"] == 80.0
    assert set(D.QUICK_DOMAINS) <= set(D.DOMAINS) and set(D.QUICK_SEEDS) <= set(D.SEEDS)


def test_noise_seeds_differ_per_corruption_seed_split_and_image():
    keys = [(c, s, sp, i) for c in D.CORRUPTION_DOMAINS for s in D.SEEDS for sp in D.SPLITS
            for i in range(64)]  # fmt: skip
    assert len({D.noise_seed(*k) for k in keys}) == len(keys)
