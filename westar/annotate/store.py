"""The annotation session: images, proposed samples, answers, and the pairs file.

Everything a person does (answer, move a point, skip, undo) changes one image's state
and is written at once to the pairs file (docs/formats.md), atomically: a temporary
file in the same folder, flushed and fsynced, then `os.replace`. A kill at any moment
leaves either the previous or the new file, both valid.

Per annotated image the file holds the standard entry ("width", "height", "pairs") plus
an "annotate" block that `westar train` ignores and this tool resumes from:

    "annotate": {"samples": [{"anchor": [x, y], "p": [x, y], "q": [x, y],
                              "answers": ["farther", null, null]}, ...],
                 "skipped": false}

"pairs" = the pairs that were there before (kept untouched, e.g. from `westar pairs`)
followed by one pair per answered slot (see `westar.annotate.sampling.PAIR_SLOTS`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from westar.annotate.consistency import conflicting_pairs
from westar.annotate.sampling import PAIR_SLOTS, POINT_NAMES, image_rng, propose_samples
from westar.data import RELATIONS, DataError, image_size, list_images, load_pairs

__all__ = ["AnnotationSession", "ImageItem", "write_json_atomic", "BROWSER_TYPES"]

# Formats a browser shows as they are; others (TIFF) are sent re-encoded as PNG.
BROWSER_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
}

ScoreFn = Callable[[Path, int, int], np.ndarray]  # (image path, width, height) -> (H, W)


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write JSON to `path` via a fsynced temporary file in the same folder + os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ImageItem:
    """One image of the session. samples is None until first shown (proposed lazily)."""

    stem: str
    path: Path
    width: int
    height: int
    existing: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] | None = None
    skipped: bool = False
    touched: bool = False  # changed in this tool (else the file's entry is written back as is)
    original_entry: dict[str, Any] | None = None

    def tool_pairs(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(sample, slot, pair) for every answered slot."""
        out = []
        for s, sample in enumerate(self.samples or []):
            for k, (a, b) in enumerate(PAIR_SLOTS):
                rel = sample["answers"][k]
                if rel is not None:
                    out.append(
                        (s, k, {"a": list(sample[a]), "b": list(sample[b]), "relation": rel})
                    )
        return out

    def all_pairs(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.existing] + [p for _, _, p in self.tool_pairs()]

    def conflicts(self) -> tuple[list[list[int]], list[int]]:
        """([sample, slot] of conflicting answers, indices of conflicting existing pairs)."""
        tool = self.tool_pairs()
        bad = conflicting_pairs(self.all_pairs())
        n = len(self.existing)
        return [[s, k] for j, (s, k, _) in enumerate(tool) if n + j in bad], sorted(
            i for i in bad if i < n
        )

    def answered(self) -> int:
        return sum(r is not None for s in self.samples or [] for r in s["answers"])

    def entry(self) -> dict[str, Any]:
        if not self.touched and self.original_entry is not None:
            return self.original_entry
        samples = [
            {**{n: list(s[n]) for n in POINT_NAMES}, "answers": list(s["answers"])}
            for s in self.samples or []
        ]
        return {
            "width": self.width,
            "height": self.height,
            "pairs": self.all_pairs(),
            "annotate": {"samples": samples, "skipped": self.skipped},
        }


def _check_int(value: Any, name: str) -> None:
    """A JSON integer (true / false are not 0 / 1)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_point(pt: Any, width: int, height: int) -> list[int]:
    if (
        not isinstance(pt, (list, tuple))
        or len(pt) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pt)
    ):
        raise ValueError(f"a point must be [x, y] integers, got {pt!r}")
    x, y = pt
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point [x={x}, y={y}] lies outside the {width}x{height} image")
    return [x, y]


def _restore_samples(block: Any, item: ImageItem) -> tuple[list[dict[str, Any]], bool]:
    """Samples and skipped flag from a file's "annotate" block, checked."""
    if not isinstance(block, dict) or not isinstance(block.get("samples", []), list):
        raise ValueError('"annotate" must be {"samples": [...], "skipped": bool}')
    samples = []
    for j, s in enumerate(block.get("samples", [])):
        if not isinstance(s, dict):
            raise ValueError(f"samples[{j}] must be an object")
        try:
            pts = {n: _check_point(s[n], item.width, item.height) for n in POINT_NAMES}
            answers = s.get("answers", [None] * 3)
            if not isinstance(answers, list) or len(answers) != 3:
                raise ValueError("answers must be a list of 3 relations or nulls")
            for r in answers:
                if r is not None and r not in RELATIONS:
                    raise ValueError(f"answer must be one of {RELATIONS} or null, got {r!r}")
        except (KeyError, ValueError) as err:
            raise ValueError(f"samples[{j}]: {err}") from err
        samples.append({**pts, "answers": list(answers)})
    return samples, bool(block.get("skipped", False))


class AnnotationSession:
    """State of one `westar annotate` run; thread-safe (one lock around every change).

    images_dir: the folder of images; out: the pairs JSON (created if missing, else read,
    checked and extended); samples: structured samples per image (3 pairs each);
    score_fn: optional informativeness map per image (model guidance).
    """

    def __init__(
        self,
        images_dir: str | Path,
        out: str | Path,
        samples: int = 5,
        seed: int = 0,
        score_fn: ScoreFn | None = None,
    ):
        if samples < 1:
            raise ValueError(f"--samples must be at least 1, got {samples}")
        self.images_dir = Path(images_dir)
        self.out = Path(out)
        self.samples_per_image = samples
        self.seed = seed
        self.score_fn = score_fn
        self.notes: list[str] = []
        self._lock = threading.RLock()
        self._history: list[tuple[int, list | None, bool, bool]] = []
        self.saves = 0

        root = self.images_dir.resolve()
        files = list_images(self.images_dir)  # DataError: missing folder / no images
        doc, entries = self._read_out()
        self._meta = {k: v for k, v in doc.items() if k not in ("images", "annotate")}
        self.items: list[ImageItem] = []
        for path in files:
            real = path.resolve()
            if not real.is_relative_to(root):
                self.notes.append(f"{path}: skipped, a link to outside the image folder ({real})")
                continue
            try:
                h, w = image_size(real)
            except DataError as err:
                self.notes.append(f"{path}: skipped ({_reason(err)})")
                continue
            self.items.append(self._item(path.stem, real, w, h, entries.pop(path.stem, None)))
        if not self.items:
            raise DataError(self.images_dir, "no readable images: " + "; ".join(self.notes))
        self._others = entries  # entries of images not in the folder: kept as they are

    # ------------------------------------------------------------------ loading

    def _read_out(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.out.is_dir():
            raise DataError(self.out, "--out is a folder; give a file name such as pairs.json")
        parent = self.out.parent
        if not parent.is_dir():
            raise DataError(parent, "folder of --out not found")
        prefix = f".{self.out.name}."
        for stale in parent.iterdir():  # temporary files left by a run killed mid-write
            if stale.name.startswith(prefix) and stale.name.endswith(".tmp") and stale.is_file():
                stale.unlink(missing_ok=True)
        if not self.out.exists():
            return {}, {}
        load_pairs(self.out)  # DataError naming the file and the bad entry
        doc = json.loads(self.out.read_text())
        return doc, dict(doc["images"])

    def _item(self, stem: str, path: Path, w: int, h: int, entry: dict | None) -> ImageItem:
        item = ImageItem(stem, path, w, h)
        if entry is None:
            return item
        if (int(entry["width"]), int(entry["height"])) != (w, h):
            raise DataError(
                self.out,
                f"image {stem!r} is annotated as {entry['width']}x{entry['height']} but "
                f"{path.name} is {w}x{h}",
            )
        item.original_entry = entry
        pairs = [dict(p) for p in entry.get("pairs", [])]
        if "annotate" in entry:
            try:
                item.samples, item.skipped = _restore_samples(entry["annotate"], item)
            except ValueError as err:
                raise DataError(self.out, f"images[{stem!r}].annotate: {err}") from err
            for _, _, p in item.tool_pairs():  # what remains was there before this tool
                key = (tuple(p["a"]), tuple(p["b"]), p["relation"])
                for i, q in enumerate(pairs):
                    if (tuple(q["a"]), tuple(q["b"]), q["relation"]) == key:
                        del pairs[i]
                        break
        item.existing = pairs
        return item

    def _ensure_samples(self, item: ImageItem) -> None:
        if item.samples is not None:
            return
        score = None
        if self.score_fn is not None:
            score = self.score_fn(item.path, item.width, item.height)
        rng = image_rng(self.seed, item.stem)
        proposals = propose_samples(item.width, item.height, self.samples_per_image, rng, score)
        item.samples = [{**s, "answers": [None, None, None]} for s in proposals]

    # ------------------------------------------------------------------ views

    def _is_done(self, item: ImageItem) -> bool:
        if item.skipped:
            return True
        if item.samples is None:
            return False
        return item.answered() == 3 * len(item.samples) and not item.conflicts()[0]

    def summary(self) -> dict[str, Any]:
        """Progress and the list of images (for the page's header and image list)."""
        with self._lock:
            rows, pairs_done, pairs_total = [], 0, 0
            for i, item in enumerate(self.items):
                slots = 3 * (
                    len(item.samples) if item.samples is not None else self.samples_per_image
                )
                answered = item.answered()
                n_conf = len(item.conflicts()[0]) if item.samples else 0
                if not item.skipped:
                    pairs_done += answered
                    pairs_total += slots
                rows.append(
                    {
                        "index": i,
                        "stem": item.stem,
                        "answered": answered,
                        "slots": slots,
                        "existing": len(item.existing),
                        "skipped": item.skipped,
                        "conflicts": n_conf,
                        "done": self._is_done(item),
                    }
                )
            return {
                "images": rows,
                "images_done": sum(r["done"] for r in rows),
                "pairs_done": pairs_done,
                "pairs_total": pairs_total,
                "notes": list(self.notes),
                "out": str(self.out),
                "saves": self.saves,
                "next": self.next_image(-1),
            }

    def next_image(self, after: int) -> int | None:
        """Index of the first unfinished image after `after` (wrapping), None if all done."""
        n = len(self.items)
        for d in range(1, n + 1):
            i = (after + d) % n
            if not self._is_done(self.items[i]):
                return i
        return None

    def image_state(self, index: int) -> dict[str, Any]:
        with self._lock:
            item = self._get(index)
            self._ensure_samples(item)
            conflicts, existing_conflicts = item.conflicts()
            return {
                "index": index,
                "stem": item.stem,
                "name": item.path.name,
                "width": item.width,
                "height": item.height,
                "samples": copy.deepcopy(item.samples),
                "existing": copy.deepcopy(item.existing),
                "skipped": item.skipped,
                "conflicts": conflicts,
                "existing_conflicts": existing_conflicts,
                "done": self._is_done(item),
            }

    def image_bytes(self, index: int) -> tuple[bytes, str]:
        """The image file's bytes and MIME type (TIFF and others re-encoded as PNG)."""
        item = self._get(index)
        data = self._read_checked(item)
        ctype = BROWSER_TYPES.get(item.path.suffix.lower())
        if ctype is not None:
            return data, ctype
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "image/png"

    def _read_checked(self, item: ImageItem) -> bytes:
        """The file's bytes, checked at each request: still a regular file (not replaced by
        a symbolic link since the start) inside the image folder; opened without following
        a link, so a swap between the check and the read fails too."""
        path = item.path
        if path.is_symlink() or not path.resolve().is_relative_to(self.images_dir.resolve()):
            raise PermissionError(1, "not served: no longer a file of the image folder", str(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _get(self, index: int) -> ImageItem:
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < len(self.items)
        ):
            raise KeyError(f"no image {index!r}")
        return self.items[index]

    # ------------------------------------------------------------------ changes

    def _change(self, index: int) -> ImageItem:
        item = self._get(index)
        self._ensure_samples(item)
        self._history.append((index, copy.deepcopy(item.samples), item.skipped, item.touched))
        item.touched = True
        return item

    def answer(self, index: int, sample: int, slot: int, relation: str) -> None:
        """Record "point a of (sample, slot) is <relation> than point b" and save."""
        _check_int(sample, "sample")
        _check_int(slot, "slot")
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
        with self._lock:
            item = self._get(index)
            self._ensure_samples(item)
            if not (0 <= sample < len(item.samples) and 0 <= slot < 3):
                raise ValueError(f"no pair (sample {sample}, slot {slot}) on image {item.stem!r}")
            self._change(index).samples[sample]["answers"][slot] = relation
            self.save()

    def move(self, index: int, sample: int, point: str, xy: list[int]) -> None:
        """Move one point of a sample; the answers that involve it are cleared."""
        _check_int(sample, "sample")
        with self._lock:
            item = self._get(index)
            self._ensure_samples(item)
            if not 0 <= sample < len(item.samples) or point not in POINT_NAMES:
                raise ValueError(f"no point {point!r} in sample {sample} of {item.stem!r}")
            xy = _check_point(xy, item.width, item.height)
            s = self._change(index).samples[sample]
            s[point] = xy
            for k, (a, b) in enumerate(PAIR_SLOTS):
                if point in (a, b):
                    s["answers"][k] = None
            self.save()

    def skip(self, index: int, skipped: bool = True) -> None:
        if not isinstance(skipped, bool):  # "false" is not False
            raise ValueError(f"skipped must be true or false, got {skipped!r}")
        with self._lock:
            self._change(index).skipped = bool(skipped)
            self.save()

    def undo(self) -> int | None:
        """Revert the last change (of any image); returns that image's index or None."""
        with self._lock:
            if not self._history:
                return None
            index, samples, skipped, touched = self._history.pop()
            item = self.items[index]
            item.samples, item.skipped, item.touched = samples, skipped, touched
            self.save()
            return index

    # ------------------------------------------------------------------ file

    def document(self) -> dict[str, Any]:
        """The pairs document as it is written (docs/formats.md + "annotate" blocks)."""
        images = dict(self._others)
        conflicts = {}
        for item in self.items:
            if item.touched or item.original_entry is not None:
                images[item.stem] = item.entry()
            if item.touched and item.samples is not None:
                n = len(item.conflicts()[0])
                if n:
                    conflicts[item.stem] = n
        doc = {"version": 1, "coordinates": "xy", **self._meta}
        doc["annotate"] = {"tool": "westar annotate", "unresolved_conflicts": conflicts}
        doc["images"] = images
        return doc

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.out, self.document())
            self.saves += 1


def _reason(err: DataError) -> str:
    msg = str(err)
    prefix = f"{err.path}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg
