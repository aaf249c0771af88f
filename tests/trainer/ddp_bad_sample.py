"""`westar ...` with one sample that fails to load during training (for torchrun tests).

The upfront dataset check decodes every file, so a file that is bad from the start never
reaches training; this stands for one that becomes unreadable during the run (a network
filesystem error, a file replaced on disk). Usage: python ddp_bad_sample.py STEM ARGS...
"""

import sys

from westar.cli import main
from westar.data import AdaptationDataset, DataError

BAD_STEM = sys.argv[1]
_load = AdaptationDataset.load


def load(self, index, crop_seed=None):
    sample = self.samples[index]
    if sample.stem == BAD_STEM:
        raise DataError(sample.image, "cannot read image (simulated error during training)")
    return _load(self, index, crop_seed)


AdaptationDataset.load = load

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
