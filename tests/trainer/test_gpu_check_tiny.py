"""The GPU check's trainer stage and training-step benchmark, run tiny on CPU so that they
cannot rot between GPU runs (issue 20).

The same scripts as `scripts/gpu_check.sh` runs on a GPU, with their tiny settings:
`scripts/gpu_train_check.py --profile tiny` (a 1 M parameter Depth Anything V2 at 56 px,
bf16 autocast on CPU, every command in this process except the SIGKILLed run) and
`benchmarks/train_step.py --model tiny` (both steps, the sync count through the profiler,
the memory-estimate comparison's code path).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """These stages run bf16 in this process: Accelerate's state (a singleton) would refuse
    the next test's precision, so it is reset after each test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAGE_LINES = (
    "fixtures", "train_straight", "train_killed", "train_resume", "check_resume",
    "train_accum", "check_accum", "train_ckpt", "check_ckpt", "masks_sam2", "eval",
    "check_eval", "predict", "check_predict", "merge", "predict_merged", "check_merged",
    "demo", "trainer_stage",
)  # fmt: skip


def test_trainer_stage_tiny_cpu(tmp_path):
    """Every command and check of the trainer stage passes; one summary line each, with
    its exit status and seconds, also appended to the --summary file (gpu_check's)."""
    stage = _load("scripts/gpu_train_check.py", "gpu_train_check")
    summary = tmp_path / "summary.txt"
    summary.write_text("build      rc=0     1s  build.log\n")
    out = tmp_path / "train"
    rc = stage.main([str(out), "--profile", "tiny", "--device", "cpu", "--in-process",
                     "--summary", str(summary)])  # fmt: skip
    lines = (out / "summary.txt").read_text().splitlines()
    assert rc == 0, "\n".join(lines)
    names = [line.split()[0] for line in lines]
    assert names == list(STAGE_LINES)
    for line in lines:
        fields = line.split()
        assert fields[1] == "rc=0" and fields[2].endswith("s"), line
    assert summary.read_text().splitlines()[1:] == lines  # appended after gpu_check's lines
    result = json.loads((out / "train_check.json").read_text())["results"]
    assert 0 < result["train_resume"]["resumed_at"] < 4
    # CPU: the resumed run is the straight run, to the bit
    assert result["check_resume"]["loss_max_rel_diff"] == 0.0
    assert result["check_resume"]["adapter_rel_diff"] == 0.0
    assert result["check_resume"]["adapter_b_norm"] > 0  # the adapters did train
    assert result["check_predict"]["maps"] == 4


def test_trainer_stage_reports_a_broken_command(tmp_path, monkeypatch):
    """A failing command is a failed line naming its log, and the stage fails."""
    stage = _load("scripts/gpu_train_check.py", "gpu_train_check_fail")
    chk = stage.Check(tmp_path, None, in_process=True)
    rc = chk.run("eval", ["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path)])
    assert rc == 2
    line = (tmp_path / "summary.txt").read_text()
    assert line.split()[:2] == ["eval", "rc=2"] and "logs/eval.log" in line
    assert chk.failed == ["eval"]


def test_train_step_benchmark_tiny_cpu(tmp_path):
    """benchmarks/train_step.py at tiny size: both variants timed, the loss share, sync
    count and memory-vs-estimate rows present; --targets and --json work."""
    bench = _load("benchmarks/train_step.py", "train_step_bench")
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", "tiny", "--size", "56", "--batch", "2", "--steps", "2",
                     "--warmup", "1", "--profile-steps", "1", "--memory-arch", "tiny",
                     "--precision", "bf16", "--no-memory", "--json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["results"]["2"]["rows"]
    assert set(rows) == {"westar", "researcher"}
    for r in rows.values():
        assert r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["images_per_s"] > 0
        assert 0 < r["loss_share"] < 1 and math.isfinite(r["loss_median_s"])
        assert r["syncs_per_step"] == 0  # CPU: nothing to wait for; the profiler ran
    assert [m["checkpointing"] for m in result["memory"]] == [False, True]
    assert all(m["estimate_gib"] > 0 for m in result["memory"])
    # the targets are for the GPU: the tiny model's losses weigh more than 2 % of its step
    assert bench.missed_targets({2: {"rows": rows}}) == result["missed_targets"]


def test_sync_call_names():
    """The profiler's CUDA calls that block the host, and the asynchronous ones that do not."""
    bench = _load("benchmarks/train_step.py", "train_step_names")
    for name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                 "cuStreamSynchronize", "cudaMemcpy"):  # fmt: skip
        assert bench.is_sync_call(name), name
    for name in ("cudaMemcpyAsync", "cudaLaunchKernel", "aten::item", "cudaStreamWaitEvent"):
        assert not bench.is_sync_call(name), name


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
