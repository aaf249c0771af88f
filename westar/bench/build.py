"""Building the benchmark's folders: `build(root, ...)`, resumable and idempotent.

Each (domain, seed, split) folder is written to a temporary folder beside it and renamed
into place when complete (westar.outputs.replace_dir), with its definition as split.json.
A complete folder whose split.json matches the current definition is reused; one that does
not is refused (before any work) unless overwrite=True.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from . import frozen as D

__all__ = ["split_dir", "build", "plan", "SPLIT_JSON", "MANIFEST"]

SPLIT_JSON = "split.json"
MANIFEST = "manifest.json"
FILES_JSON = "files.json"  # sha256 of every file of a split folder as built


def fingerprint(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` but FILES_JSON."""
    import hashlib

    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel != FILES_JSON:
            out[rel] = (
                "symlink" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return out


def check_contents(folder: Path) -> None:
    """Refuse a split folder whose files differ from those it was built with (edited by
    hand); a folder built before FILES_JSON existed gets one now."""
    recorded = _read_json(folder / FILES_JSON)
    current = fingerprint(folder)
    if recorded is None:
        write_json(folder / FILES_JSON, current)
        return
    if recorded != current:
        changed = sorted(k for k in current.keys() & recorded.keys() if current[k] != recorded[k])
        added = sorted(current.keys() - recorded.keys())
        missing = sorted(recorded.keys() - current.keys())
        what = "; ".join(
            f"{name}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
            for name, files in (("changed", changed), ("added", added), ("missing", missing))
            if files
        )
        raise FileExistsError(
            f"{folder}: edited since it was built ({what}); pass --overwrite to rebuild it, "
            "or use another --root"
        )


def split_dir(root: str | os.PathLike, domain: str, seed: int, split: str) -> Path:
    """<root>/<domain>/seed<k>/<split>: a dataset folder in docs/formats.md's layout."""
    D.family(domain)  # checks the name
    if split not in D.SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {D.SPLITS}")
    return Path(root) / domain / f"seed{int(seed)}" / split


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def plan(
    root: str | os.PathLike,
    seeds: Iterable[int],
    domains: Iterable[str],
    quick: bool = False,
    overwrite: bool = False,
) -> tuple[list[tuple[str, int, str, dict]], list[tuple[str, int, str]]]:
    """(to build, to reuse): to build as (domain, seed, split, split definition).

    Raises FileExistsError naming the first folder built under another definition (or
    not a complete build) unless `overwrite`; nothing is written.
    """
    sizes = D.QUICK_SIZES if quick else D.SPLIT_SIZES
    todo, reuse = [], []
    for seed in seeds:
        for split in D.SPLITS:
            for domain in domains:
                want = D.split_definition(domain, seed, split, sizes[split])
                folder = split_dir(root, domain, seed, split)
                if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                    raise FileExistsError(f"{folder}: exists and is not a folder")
                if not folder.exists():
                    todo.append((domain, seed, split, want))
                    continue
                have = _read_json(folder / SPLIT_JSON)
                if have == want:
                    try:
                        check_contents(folder)
                        reuse.append((domain, seed, split))
                    except FileExistsError:
                        if not overwrite:
                            raise
                        todo.append((domain, seed, split, want))
                elif overwrite:
                    todo.append((domain, seed, split, want))
                else:
                    what = "another benchmark definition" if have else "an unknown content"
                    raise FileExistsError(
                        f"{folder}: built under {what} (split.json differs from this "
                        f"benchmark's); pass --overwrite to rebuild it, or use another --data"
                    )
    return todo, reuse


def _clear_stale_tmp(parent: Path, split: str) -> None:
    """Remove temporary folders of this split left by a killed build."""
    for tmp in parent.glob(f".tmp-{split}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue  # a running build owns it
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _render(fam: str, seeds: range):
    from westar.synth import render

    return [render(fam, s, D.SIZE, D.SIZE) for s in seeds]


def _write_split(root: Path, domain: str, seed: int, split: str, want: dict, scenes) -> int:
    """Write one complete split folder (temporary folder, then renamed). Returns images."""
    from westar.corrupt import corrupt_image
    from westar.outputs import replace_dir
    from westar.pairs import make_pairs_file
    from westar.synth import write_split_scene

    final = split_dir(root, domain, seed, split)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_tmp(final.parent, split)
    tmp = final.parent / f".tmp-{split}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    corr = D.corruption(domain)
    seeds = range(*want["scene_seeds"])
    for i, (scene_seed, scene) in enumerate(zip(seeds, scenes, strict=True)):
        image = scene.image
        if corr is not None:
            noise = D.noise_seed(corr, seed, split, i)
            image = corrupt_image(image, corr, want["severity"], seed=noise, depth=scene.depth)
        write_split_scene(tmp, split, scene_seed, scene, image)
    if split == "train":  # the weak labels: ordinal pairs from the ground truth
        p = want["pairs"]
        make_pairs_file(
            tmp / "images",
            tmp / "depth",
            tmp / "pairs.json",
            samples=p["samples"],
            equal_ratio=p["equal_ratio"],
            max_depth=p["max_depth"],
            seed=p["seed"],
        )
    write_json(tmp / SPLIT_JSON, want)
    write_json(tmp / FILES_JSON, fingerprint(tmp))
    replace_dir(tmp, final)
    return len(seeds)


def _build_group(root: str, fam: str, seed: int, split: str, jobs: list) -> int:
    """Render the scenes of (family, seed, split) once, write every domain's folder."""
    scenes = _render(fam, range(*jobs[0][3]["scene_seeds"]))
    return sum(_write_split(Path(root), d, s, sp, want, scenes) for d, s, sp, want in jobs)


def build(
    root: str | os.PathLike = "runs/bench/data",
    *,
    seeds: Iterable[int] | None = None,
    domains: Iterable[str] | None = None,
    quick: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Build (or reuse) every (domain, seed, split) folder under `root`; write and return
    the manifest ({"definition", "splits": {"<domain>/seed<k>/<split>": split.json}}).

    Default seeds/domains: the benchmark's (SEEDS, DOMAINS), or the quick ones. Every
    corruption domain of a seed is made from the same rooms scenes as "clean".
    """
    from tqdm.auto import tqdm

    root = Path(root)
    seeds = list(D.QUICK_SEEDS if quick else D.SEEDS) if seeds is None else list(seeds)
    domains = list(D.QUICK_DOMAINS if quick else D.DOMAINS) if domains is None else list(domains)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(20, "--data exists and is not a folder", str(root))
    todo, reuse = plan(root, seeds, domains, quick, overwrite)
    groups: dict[tuple, list] = {}
    for job in todo:
        domain, seed, split, _ = job
        groups.setdefault((D.family(domain), seed, split), []).append(job)
    total = sum(len(jobs) for jobs in groups.values())
    bar = tqdm(total=total, desc="bench: build splits", unit="split", disable=not progress)
    if progress and reuse:
        tqdm.write(f"bench: reusing {len(reuse)} complete split folders under {root}")
    root.mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(groups) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_build_group, str(root), *k, v): v for k, v in groups.items()}
            for fut in as_completed(futures):
                fut.result()
                bar.update(len(futures[fut]))
    else:
        for key, jobs in groups.items():
            _build_group(str(root), *key, jobs)
            bar.update(len(jobs))
    bar.close()
    return write_manifest(root, quick)


def write_manifest(root: Path, quick: bool) -> dict[str, Any]:
    """manifest.json: the definition and every complete split folder that matches it."""
    defn = D.definition(quick)
    sizes = defn["split_sizes"]
    splits = {}
    for domain in D.DOMAINS:
        for seed_dir in sorted((root / domain).glob("seed*")):
            try:
                seed = int(seed_dir.name[4:])
            except ValueError:
                continue
            for split in D.SPLITS:
                have = _read_json(seed_dir / split / SPLIT_JSON)
                if have is not None and seed < D.MAX_SEED:
                    if have == D.split_definition(domain, seed, split, sizes[split]):
                        splits[f"{domain}/seed{seed}/{split}"] = have
    manifest = {"definition": defn, "splits": splits}
    write_json(root / MANIFEST, manifest)
    return manifest
