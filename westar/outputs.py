"""Writing folders the user sees without losing data: check the target, then a temporary
folder renamed into place.

- `check_output_folder`: refuse an output that is a file or a link, that is or holds (or
  lies inside) a folder that must survive (the base model, the source), or that is a
  non-empty folder without `overwrite`.
- `replace_dir`: move a finished temporary folder over the target in one rename (the
  old target is renamed aside first, then deleted), fsynced, so a crash leaves the old
  or the new folder, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["check_output_folder", "replace_dir", "fsync_tree", "fsync_dir"]


def check_output_folder(output: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an output folder that would destroy data, before any work.

    `protected`: {what: folder} that must neither be `output` nor lie inside it, nor
    contain it (e.g. the base model). A non-empty existing `output` needs `overwrite`; an
    existing file or a symbolic link is always refused.
    """
    if output.is_symlink():
        raise FileExistsError(f"{output}: output is a symbolic link; give a real folder")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output}: output exists and is not a folder")
    target = output.resolve()
    for what, folder in protected.items():
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise ValueError(f"{output}: output would overwrite the {what} ({folder})")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output}: output folder exists and is not empty; pass --overwrite to replace it"
        )


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an old `final` (same parent)."""
    fsync_tree(tmp)
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        final.replace(old)
        tmp.replace(final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.replace(final)
    fsync_dir(final.parent)
