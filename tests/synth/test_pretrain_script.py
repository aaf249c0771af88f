"""scripts/pretrain_source.py runs end to end (a few steps of a very small model)."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_source.py"


def _load():
    spec = importlib.util.spec_from_file_location("pretrain_source", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_alignment_metrics_are_affine_invariant():
    mod = _load()
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 10, size=(20, 30)).astype(np.float32)
    absrel, d1 = mod.align_metrics(3.0 / depth + 0.2, depth)
    assert absrel < 1e-6 and d1 == 1.0
    absrel, d1 = mod.align_metrics(rng.uniform(size=depth.shape), depth)
    assert absrel > 0.1 and d1 < 0.9


def test_pretrain_script_smoke(tmp_path):
    import torch

    mod = _load()
    out = tmp_path / "model"
    argv = ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--steps", "3"]
    argv += ["--pool", "6", "--size", "56", "--width", "64", "--eval-n", "2", "--batch", "2"]
    argv += ["--eval-severity", "3", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        _run(mod, argv, out)
    finally:
        torch.set_num_threads(threads)


def _run(mod, argv, out):
    mod.main(argv)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[0]["split"] == "clean" and len(rows) > 1
    assert all(np.isfinite(r["absrel"]) for r in rows)
    # resumes from the checkpoint instead of starting over
    mod.main(argv + ["--steps", "4", "--eval-n", "1"])
