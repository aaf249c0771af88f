"""setuptools' build backend, plus one thing: build against the torch you already have.

An isolated build (plain `pip install .`) starts from an empty environment. Listing
`torch` as a build requirement would then fetch the newest release (a multi-GB CUDA
build), and an extension built against another torch version does not load. So the
build requirement names the exact torch version installed in the interpreter that runs
pip. With `--no-build-isolation` none of this runs and the installed torch is used.
"""

from __future__ import annotations

import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (re-export the PEP 517 hooks)


def _target_torch_requirement() -> str:
    # -I: ignore PYTHONPATH and user site, i.e. see the target environment, not the
    # isolated build environment that pip put on sys.path.
    probe = "import torch, sys; sys.stdout.write(torch.__version__)"
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return "torch"
    version = out.stdout.strip()
    return f"torch=={version}" if out.returncode == 0 and version else "torch"


# setuptools' own hooks would execute setup.py to find setup_requires, and setup.py
# imports torch, which is what is being asked for; westar has no setup_requires.
def get_requires_for_build_wheel(config_settings=None):
    return [_target_torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return [_target_torch_requirement()]
