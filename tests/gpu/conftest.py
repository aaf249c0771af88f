"""GPU tests: run only where a CUDA device is visible and westar_ops has CUDA kernels.

Without a GPU the modules here are not collected (CI has none; each module also skips
itself); on a GPU machine run ``python -m pytest tests/gpu``.
"""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
