"""Checkpoint folders of a training run: listing, checking, RNG state, atomic renames, lock.

The training state itself is written and read by `accelerate` (`Accelerator.save_state` /
`load_state`, see `westar.train.Trainer.save_checkpoint`); this module holds what the
library does not do for us:

- `find_checkpoints` / `find_latest_checkpoint`: complete `checkpoints/step_N` folders
  (those holding state.json; a stray empty `step_N` folder is ignored).
- `verify_checkpoint`: every file read on resume, read once up front: safetensors files
  parsed, pickle-format files (accelerate's optimizer/scheduler state) loaded with
  `torch.load(weights_only=True)`, which refuses anything but tensors and plain
  containers. A refused pickle raises `UnsafeCheckpointError`; a truncated or missing
  file `CheckpointError` (resume then falls back to the previous checkpoint).
- `rng_tensors` / `set_rng_from_tensors`: the torch, CUDA, numpy and Python RNG states as
  plain integer tensors, stored with safetensors (no pickle).
- `RunLock`: one training run per output folder at a time.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "UnsafeCheckpointError",
    "RunLockedError",
    "RunLock",
    "find_checkpoints",
    "find_latest_checkpoint",
    "refuse_existing_run",
    "verify_checkpoint",
    "rng_tensors",
    "set_rng_from_tensors",
]

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "state.json"
# Files written by accelerate's save_state in pickle format, loaded again by load_state.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing or truncated file); names it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would need unpickling arbitrary objects: never loaded."""


class RunLockedError(FileExistsError):
    """Another process trains into the same output folder."""


# --------------------------------------------------------------------------- listing


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under <output_dir>/checkpoints, newest first.

    Complete = a `step_N` folder holding state.json (written last, and the folder only
    appears by rename once everything is in it); anything else is ignored.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)):
            continue
        try:
            step = int(p.name[len(CHECKPOINT_PREFIX) :])
        except ValueError:
            continue
        if (p / STATE_FILE).is_file():
            found.append((step, p))
    return [p for _, p in sorted(found, reverse=True)]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest complete checkpoint under <output_dir>/checkpoints (None if none)."""
    found = find_checkpoints(output_dir)
    return found[0] if found else None


# --------------------------------------------------------------------------- checking


def refuse_existing_run(output_dir: str | Path) -> None:
    """FileExistsError when `output_dir` already holds a run (a checkpoint or a final
    adapter) and no --resume was given; checked before the model is loaded."""
    out = Path(output_dir)
    if find_latest_checkpoint(out) is not None or (out / "adapter").is_dir():
        raise FileExistsError(
            f"{out} already holds a run (checkpoints/ or adapter/): pass --resume to "
            "continue it, or choose another --out"
        )


def _check_safetensors(path: Path) -> None:
    from safetensors.torch import load_file

    try:
        load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err


def check_pickle_file(path: Path) -> None:
    """Load a pickle-format torch file with weights_only=True; never runs its code."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file holds pickled objects other than tensors "
                "(loading it could run code); it was not written by westar"
            ) from err
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from err
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from err


def verify_checkpoint(path: Path, required: tuple[str, ...]) -> None:
    """Read every file of a checkpoint once; raise (Unsafe)CheckpointError naming the bad one.

    `required`: file names (relative to `path`) that must exist.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    for name in required:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.suffix in PICKLE_SUFFIXES:
            check_pickle_file(file)


# --------------------------------------------------------------------------- RNG state


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch, CUDA, numpy and Python RNG states as integer tensors."""
    out = {"torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s.clone()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    assert kind == "MT19937"
    out["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy.pos_has_gauss"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python.state"] = torch.tensor(internal, dtype=torch.int64)
    out["python.version_has_gauss"] = torch.tensor(
        [version, gauss_next is not None], dtype=torch.int64
    )
    out["python.gauss"] = torch.tensor([gauss_next or 0.0], dtype=torch.float64)
    return out


def set_rng_from_tensors(state: dict[str, torch.Tensor]) -> None:
    """Inverse of `rng_tensors`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = sorted((k for k in state if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k].to(torch.uint8) for k in cuda])
    pos, has_gauss = (int(v) for v in state["numpy.pos_has_gauss"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy.keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(state["numpy.gauss"][0]),
        )
    )
    version, has_next = (int(v) for v in state["python.version_has_gauss"])
    gauss_next = float(state["python.gauss"][0]) if has_next else None
    random.setstate((version, tuple(int(v) for v in state["python.state"]), gauss_next))


# --------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """`<folder>/.westar.lock` holding "pid host" while a run trains into `folder`.

    Where the OS has `fcntl` (Linux, macOS) the file is also locked with a POSIX record
    lock (`lockf`), which the kernel releases when the process ends, however it ends: a
    file left by a killed run is taken over, and two runs starting at once cannot both
    win. Not `flock`: a flock is shared with forked children (DataLoader workers), which
    outlive a killed trainer by seconds and kept its folder locked. A POSIX lock belongs
    to the process alone, and is dropped when the process closes *any* descriptor of the
    file, so nothing here opens the lock file again while holding it. Two locks on one
    folder in one process are refused by a set of held paths. Elsewhere the pid in the
    file decides: a lock whose process is gone (same host, pid not running) is stale and
    taken over. A live holder raises RunLockedError naming its pid.
    """

    _held_here: set[str] = set()  # folders this process holds (POSIX locks do not conflict)

    NAME = ".westar.lock"

    def __init__(
        self,
        folder: str | Path,
        name: str = NAME,
        what: str = "westar train",
        flag: str = "--out",
    ):
        self.path = Path(folder) / name
        self.what, self.flag = what, flag
        self.held = False
        self._fd: int | None = None

    def _holder(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _refuse(self, holder: tuple[int, str] | None) -> RunLockedError:
        who = f"pid {holder[0]}" if holder else "another process"
        if holder and holder[1] != socket.gethostname():
            who += f" on {holder[1]}"
        return RunLockedError(
            f"{self.path.parent}: another {self.what} ({who}) is using this {self.flag} folder; "
            f"wait for it or choose another folder (if none runs, delete {self.path})"
        )

    def acquire(self) -> RunLock:
        me = f"{os.getpid()} {socket.gethostname()}\n".encode()
        try:
            import fcntl
        except ImportError:  # no fcntl: the pid decides
            return self._acquire_by_pid(me)
        key = str(self.path.resolve())
        if key in RunLock._held_here:
            raise self._refuse((os.getpid(), socket.gethostname()))
        for _ in range(3):
            if self.path.is_symlink():
                raise FileExistsError(
                    f"{self.path}: the lock file is a symbolic link; remove it (never followed)"
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                os.close(fd)
                raise self._refuse(self._holder()) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file meanwhile: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, me)
            self._fd, self.held = fd, True
            RunLock._held_here.add(key)
            return self
        raise self._refuse(self._holder())

    def _acquire_by_pid(self, me: bytes) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(
                    self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0),
                    0o644,
                )  # fmt: skip
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (
                    holder[1] != socket.gethostname() or _pid_alive(holder[0])
                ):
                    raise self._refuse(holder) from None
                self.path.unlink(missing_ok=True)  # stale (process gone) or unreadable
                continue
            os.write(fd, me)
            os.close(fd)
            self.held = True
            return self
        raise self._refuse(self._holder())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if (
            self._fd is not None
        ):  # our POSIX lock: the file is ours, and reading it would drop the lock
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # after the unlink: nobody can lock the old file in between
            self._fd = None
            RunLock._held_here.discard(str(self.path.resolve()))
            return
        holder = self._holder()
        if holder is not None and holder[0] == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
