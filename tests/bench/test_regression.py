"""The shipped source model must not regress on its own (clean) domain."""

from __future__ import annotations

from westar.bench import frozen as D
from westar.bench.calibrate import calibration_scenes
from westar.bench.score import Predictor, score

# Measured 0.2305 (delta1 0.636) for the shipped model of commit 90afbfc's era (patch 14,
# 16 minutes of pretraining) on the 16 scenes below; bound = measured + ~15 %. Reset it
# (measured + ~15 %) when a new source model ships.
SHIPPED_CLEAN_ABSREL_BOUND = 0.265
N_SCENES = 16  # the first 16 clean rooms scenes of the calibration block


def test_shipped_source_clean_absrel_is_below_bound():
    images, depths = calibration_scenes(N_SCENES)
    assert D.calibration_seeds(N_SCENES).start == D.CALIBRATION_BASE
    m = score(Predictor(device="cpu")(images), depths, D.MAX_DEPTH["clean"])
    assert m["images"] == N_SCENES
    assert m["abs_rel"] < SHIPPED_CLEAN_ABSREL_BOUND, m["abs_rel"]
