"""The frozen benchmark (issue 9): target domains that hurt the source model, built for
three seeds with train/val/test splits, and the source model's scores on them.

    westar bench                      # build runs/bench/data, score, runs/bench/bench.{json,md}
    westar bench --quick              # CI's tiny version (< 1 minute)
    westar bench --calibrate          # severity table of every corruption (calibration.md)

Definition (westar/bench/frozen.py, also written into manifest.json): 126 x 126
images; seeds 0, 1, 2; domains "clean" (indoor rooms, the source's own domain: the
reference), one per corruption of westar.corrupt at SEVERITIES[corruption] (made from the
very same rooms scenes as "clean" of the seed), and "streets" (an unseen scene family).
Per (domain, seed): train (64 images, instances/, pairs.json, depth/ for oracles), val (32,
recipe search only) and test (64, what is reported), under
``<root>/<domain>/seed<k>/<split>`` (docs/formats.md). docs/bench.md has the rest.

Python: `build(root, ...)`, `evaluate_source(root, model_dir, ...)`, `split_dir(...)`,
`calibrate(...)`; constants DOMAINS, SEEDS, SEVERITIES, MAX_DEPTH.
"""

from .build import build, split_dir
from .calibrate import calibrate, pick_severities
from .cli import CLI_HELP, cli_arguments, cli_run
from .frozen import (
    CORRUPTION_DOMAINS,
    DOMAINS,
    MAX_DEPTH,
    SEEDS,
    SEVERITIES,
    SIZE,
    SPLIT_SIZES,
    SPLITS,
    calibration_seeds,
    definition,
    scene_seeds,
)
from .score import evaluate_source

__all__ = [
    "DOMAINS",
    "CORRUPTION_DOMAINS",
    "SEEDS",
    "SEVERITIES",
    "MAX_DEPTH",
    "SIZE",
    "SPLITS",
    "SPLIT_SIZES",
    "split_dir",
    "build",
    "evaluate_source",
    "calibrate",
    "pick_severities",
    "scene_seeds",
    "calibration_seeds",
    "definition",
    "CLI_HELP",
    "cli_arguments",
    "cli_run",
]
