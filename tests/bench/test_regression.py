"""The shipped source model must not regress on its own (clean) domain."""

from __future__ import annotations

from westar.bench import frozen as D
from westar.bench.calibrate import calibration_scenes
from westar.bench.score import Predictor, score

# Measured 0.2311 (delta1 0.675) for the shipped model of 2026-12-01 (patch 7, 6000 steps,
# scripts/pretrain_source.py) on the 16 scenes below (the earlier patch-14 model: 0.2305 /
# 0.636); bound = measured + ~10 %. Reset it when a new source model ships.
SHIPPED_CLEAN_ABSREL_BOUND = 0.255
N_SCENES = 16  # the first 16 clean rooms scenes of the calibration block


def test_shipped_source_clean_absrel_is_below_bound():
    images, depths = calibration_scenes(N_SCENES)
    assert D.calibration_seeds(N_SCENES).start == D.CALIBRATION_BASE
    m = score(Predictor(device="cpu")(images), depths, D.MAX_DEPTH["clean"])
    assert m["images"] == N_SCENES
    assert m["abs_rel"] < SHIPPED_CLEAN_ABSREL_BOUND, m["abs_rel"]
