"""The trainer end to end, as users run it: the trainer stage of scripts/gpu_check.sh.

    python scripts/gpu_train_check.py OUTDIR                       # CUDA: DAv2-Small size, 518 px
    python scripts/gpu_train_check.py OUTDIR --profile tiny --device cpu --in-process   # CI

On a folder of synthetic images of mixed sizes and aspect ratios (landscape, portrait,
wide, square; instance maps, ground-truth depth, ordinal pairs) and a Depth Anything V2
model with random weights (profile "small": the transformers config with the Small's
sizes, 24.8 M parameters, 518 px crops; "tiny": a 1 M parameter one at 56 px), it runs
the `westar` commands one after the other and checks what they wrote:

    train_straight   westar train, bf16 autocast, 30 steps, a checkpoint every 10, log every step
    train_killed     the same into a second folder, SIGKILLed once its first checkpoint exists
    train_resume     the same with --resume: continues from the checkpoint to step 30
    check_resume     per-step losses and final adapters of the resumed run = the straight run's
    train_accum      --grad-accum 2, 10 steps
    check_accum      finite losses, the adapter written
    train_ckpt       --gradient-checkpointing, 30 steps
    check_ckpt       its losses = the straight run's (recomputation changes nothing)
    masks_sam2       westar masks with a random-init SAM2 through transformers
    eval             westar eval --which both (base and adapter), finite metrics
    predict          westar predict with --adapter: outputs at each image's original size
    merge            westar merge
    predict_merged   westar predict with the merged model = predict with --adapter
    demo             westar demo --quick

Each line of OUTDIR/summary.txt (and of --summary, appended as each command ends) gives a
command's or check's exit status, seconds and a note; every command's output is in
OUTDIR/logs/NAME.log and the numbers in OUTDIR/train_check.json. Exit status 0 only if
every command and check passed.

Tolerances (stated here, printed in the summary): on CPU the resumed run equals the
straight one to float32 round-off (the trainer's documented guarantee); on CUDA the
backward's float atomics (ordinal loss, SDPA, cuDNN) make two runs differ slightly, so a
step's loss may differ by 2 % (relative, + 1e-4) and the adapters' B matrices (zero at
the start: all they hold is training) by 5 % (relative Frobenius norm).

--in-process runs the commands through `westar.cli.main` inside this process (no Python
start per command: CI's tiny run), except the killed run, which always is a real process.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROFILES = {
    # arch (benchmarks/memory_estimate.ARCHS), crop side, batch, steps, checkpoint every,
    # steps of the accumulation / checkpointing runs, (H, W) of the images, their count
    "small": dict(arch="small", size=518, batch=4, steps=30, save_every=10, short_steps=10,
                  shapes=[(525, 700), (700, 525), (576, 1024), (518, 518)], images=8,
                  sam2_side=256, workers=-1),
    "tiny": dict(arch="tiny", size=56, batch=2, steps=4, save_every=2, short_steps=2,
                 shapes=[(60, 80), (80, 60), (56, 100), (56, 56)], images=4,
                 sam2_side=128, workers=1),
}  # fmt: skip
TOLERANCE = {  # (per-step loss: relative, absolute; adapter B matrices: relative norm)
    "cpu": dict(loss_rel=1e-5, loss_abs=1e-6, adapter_rel=1e-5),
    "cuda": dict(loss_rel=2e-2, loss_abs=1e-4, adapter_rel=5e-2),
}


# --------------------------------------------------------------------------- fixtures


def make_model(arch: str, path: Path) -> Path:
    """A Depth Anything V2 of `arch`'s sizes with random weights, saved as a checkpoint."""
    import torch

    from benchmarks.memory_estimate import build

    torch.manual_seed(0)
    build(arch, "cpu").save_pretrained(str(path))
    return path


def make_sam2(path: Path, side: int) -> Path:
    """A random-init SAM2 (transformers' Sam2Model, a tiny Hiera) for `westar masks`."""
    import torch
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(0)
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
        image_size=[side, side], blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4],
    )  # fmt: skip
    config = Sam2Config(
        vision_config=dict(
            backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[side // 4] * 2, [side // 8] * 2, [side // 16] * 2],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=side, patch_size=16,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=32, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )  # fmt: skip
    Sam2Model(config).eval().save_pretrained(str(path))
    return path


def make_data(root: Path, shapes: list[tuple[int, int]], n: int) -> Path:
    """n scenes (boxes in front of a sloped wall) cycling through `shapes`: images/,
    instances/ (uint16 PNG), depth/ (.npy meters) and pairs.json (`westar pairs`)."""
    from PIL import Image

    from westar.pairs import make_pairs_file

    rng = np.random.default_rng(0)
    for sub in ("images", "instances", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        depth = 4 + 4 * (1 - yy / h) + 0.5 * xx / w
        rgb = np.repeat((40 + 150 * yy / h)[..., None], 3, -1)
        inst = np.ones((h, w), np.uint16)
        for k in range(2, 12):
            y0, x0 = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
            sy, sx = rng.integers(h // 12 + 1, h // 4 + 2), rng.integers(w // 12 + 1, w // 4 + 2)
            depth[y0 : y0 + sy, x0 : x0 + sx] = rng.uniform(1, 4)
            rgb[y0 : y0 + sy, x0 : x0 + sx] = rng.uniform(0, 255, 3)
            inst[y0 : y0 + sy, x0 : x0 + sx] = k
        rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255)
        Image.fromarray(rgb.astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(inst).save(root / "instances" / f"im{i:02d}.png")
        np.save(root / "depth" / f"im{i:02d}.npy", depth.astype(np.float32))
    make_pairs_file(root / "images", root / "depth", root / "pairs.json", samples=10)
    return root


# --------------------------------------------------------------------------- running


class Check:
    """Runs the commands, writes the summary lines, collects the numbers."""

    def __init__(self, out: Path, summary: Path | None, in_process: bool):
        self.out, self.in_process = out, in_process
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.summary_files = [out / "summary.txt"] + ([summary] if summary else [])
        (out / "summary.txt").write_text("")
        self.results: dict[str, dict] = {}
        self.failed: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )

    def line(self, name: str, rc: int, seconds: float, note: str = "") -> None:
        text = f"  {name:<15} rc={rc:<3} {seconds:6.1f}s  {note}".rstrip()
        print(text, flush=True)
        for path in self.summary_files:
            with open(path, "a") as f:
                f.write(text + "\n")
        self.results.setdefault(name, {}).update(rc=rc, seconds=round(seconds, 2), note=note)
        if rc != 0:
            self.failed.append(name)

    def run(self, name: str, argv: list[str]) -> int:
        """`westar ARGV`; its output in logs/NAME.log; one summary line."""
        log = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        if self.in_process:
            from accelerate.state import AcceleratorState

            from westar.cli import main

            # a fresh process would start without Accelerate's state (a singleton that
            # refuses a second mixed-precision setting, e.g. the demo's after bf16 runs)
            AcceleratorState._reset_state(reset_partial_state=True)

            with open(log, "w") as f, redirect_stdout(f), redirect_stderr(f):
                print("$ westar " + " ".join(argv), flush=True)
                try:
                    rc = main(argv)
                except SystemExit as err:  # argparse errors
                    rc = err.code if isinstance(err.code, int) else 1
                except BaseException as err:  # noqa: BLE001 - reported, the check goes on
                    import traceback

                    traceback.print_exc()
                    rc = 1 if not isinstance(err, KeyboardInterrupt) else 130
                    if isinstance(err, KeyboardInterrupt):
                        raise
        else:
            with open(log, "w") as f:
                rc = self._start(argv, f).wait()
        seconds = time.perf_counter() - t0
        self.line(name, rc, seconds, "" if rc == 0 else f"see {log}")
        return rc

    def _start(self, argv: list[str], f, **kwargs) -> subprocess.Popen:
        """`python -m westar ARGV` with its output (after the command line) in `f`."""
        f.write("$ westar " + " ".join(argv) + "\n")
        f.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "westar", *argv], stdout=f, stderr=subprocess.STDOUT,
            env=self.env, cwd=str(ROOT), **kwargs,
        )  # fmt: skip

    def run_killed(self, name: str, argv: list[str], marker: Path, limit: float) -> dict:
        """`westar ARGV` in a process SIGKILLed as soon as `marker` exists."""
        log = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = self._start(argv, f, start_new_session=True)
            killed = False  # by us, after the marker
            while proc.poll() is None and time.perf_counter() - t0 < limit:
                if marker.exists():
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.01)
            if proc.poll() is None and not killed:  # never got there: give up
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            try:  # its DataLoader workers (same session) go too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        seconds = time.perf_counter() - t0
        ok = killed and rc == -signal.SIGKILL
        if ok:
            note = f"SIGKILL after {marker.name}"
        elif not killed and rc == -signal.SIGKILL:
            note = f"no {marker.name} within {limit:g} s: killed; see {log}"
        else:
            note = f"ended by itself (rc {rc}) before the kill; see {log}"
        self.line(name, 0 if ok else 1, seconds, note)
        return {"killed": killed, "rc": rc}

    def check(self, name: str, fn) -> None:
        """A check of what the commands wrote: fn() -> (ok, note, numbers)."""
        t0 = time.perf_counter()
        try:
            ok, note, numbers = fn()
        except Exception as err:  # noqa: BLE001 - a broken output is a failed check
            ok, note, numbers = False, f"{type(err).__name__}: {err}", {}
        self.line(name, 0 if ok else 1, time.perf_counter() - t0, note)
        self.results[name].update(numbers)


# --------------------------------------------------------------------------- checks


def read_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def compare_losses(a: Path, b: Path, steps, tol: dict) -> tuple[bool, str, dict]:
    la, lb = read_losses(a), read_losses(b)
    missing = [s for s in steps if s not in la or s not in lb]
    if missing:
        return False, f"steps {missing[:5]} missing from metrics.csv", {}
    worst, worst_step = 0.0, None
    bad = []
    for s in steps:
        if not (math.isfinite(la[s]) and math.isfinite(lb[s])):
            bad.append(s)
            continue
        diff = abs(la[s] - lb[s])
        rel = diff / max(abs(la[s]), 1e-12)
        if rel > worst:
            worst, worst_step = rel, s
        if diff > tol["loss_rel"] * abs(la[s]) + tol["loss_abs"]:
            bad.append(s)
    at = f" (step {worst_step})" if worst_step is not None else ""
    note = f"loss max rel diff {worst:.2e}{at}, tol {tol['loss_rel']:g}"
    return not bad, note + (f"; off at steps {bad[:5]}" if bad else ""), {
        "loss_max_rel_diff": worst, "loss_steps_off": bad,
    }  # fmt: skip


def compare_adapters(a: Path, b: Path, tol: dict) -> tuple[bool, str, dict]:
    from safetensors.numpy import load_file

    ta = load_file(str(a / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        return False, "adapters hold different tensors", {}
    keys = [k for k in ta if ".lora_B." in k]
    num = math.sqrt(sum(float(np.square(ta[k].astype(np.float64) - tb[k]).sum()) for k in keys))
    den = math.sqrt(sum(float(np.square(ta[k].astype(np.float64)).sum()) for k in keys))
    rel = num / max(den, 1e-30)
    ok = den > 0 and rel <= tol["adapter_rel"]
    note = f"adapter B rel diff {rel:.2e} (|B| {den:.3g}), tol {tol['adapter_rel']:g}"
    return ok, note, {"adapter_rel_diff": rel, "adapter_b_norm": den}


def check_finite_run(run: Path, steps: int) -> tuple[bool, str, dict]:
    losses = read_losses(run)
    finite = all(math.isfinite(v) for v in losses.values())
    ok = finite and steps in losses and (run / "adapter" / "adapter_model.safetensors").is_file()
    last = losses.get(steps, float("nan"))
    return ok, f"{len(losses)} steps logged, last loss {last:.4g}", {"last_loss": last}


def check_eval(path: Path) -> tuple[bool, str, dict]:
    report = json.loads(path.read_text())["results"]
    values = {k: (v["abs_rel"], v["delta1"]) for k, v in report.items()}
    ok = len(values) == 2 and all(math.isfinite(a) and math.isfinite(d) for a, d in values.values())
    note = ", ".join(f"{k}: AbsRel {a:.3f} delta1 {d:.3f}" for k, (a, d) in values.items())
    return ok, note, {"metrics": values}


def check_predict(images: Path, out: Path) -> tuple[bool, str, dict]:
    from PIL import Image

    bad = []
    n = 0
    for path in sorted(images.iterdir()):
        with Image.open(path) as im:
            w, h = im.size
        arr = np.load(out / f"{path.stem}.npy")
        n += 1
        if arr.shape != (h, w) or not np.isfinite(arr).all():
            bad.append(f"{path.name}: {arr.shape} for {(h, w)}")
    note = f"{n} maps at their images' sizes" if not bad else "; ".join(bad[:3])
    return not bad and n > 0, note, {"maps": n}


def compare_predictions(a: Path, b: Path, rel: float = 1e-3) -> tuple[bool, str, dict]:
    worst = 0.0
    paths = sorted(a.glob("*.npy"))
    if not paths:
        return False, f"no predictions in {a}", {}
    for path in paths:
        x, y = np.load(path), np.load(b / path.name)
        if x.shape != y.shape:
            return False, f"{path.name}: shapes {x.shape} / {y.shape}", {}
        span = float(x.max() - x.min()) or 1.0
        worst = max(worst, float(np.abs(x - y).max()) / span)
    return worst <= rel, f"max diff {worst:.2e} of the range, tol {rel:g}", {"max_rel": worst}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (models, data, runs, logs, summary.txt)")
    p.add_argument("--profile", choices=tuple(PROFILES), default="small")
    p.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "no"),
                   help="autocast of the training runs (default bf16)")  # fmt: skip
    p.add_argument("--summary", help="also append the summary lines to this file")
    p.add_argument("--in-process", action="store_true", help="commands in this process (CI)")
    p.add_argument("--kill-limit", type=float, default=900.0,
                   help="seconds to wait for the killed run's checkpoint (a loaded machine is slow)")  # fmt: skip
    p.add_argument("--skip", nargs="*", default=[], help="commands to leave out (e.g. demo)")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    prof = PROFILES[args.profile]
    tol = TOLERANCE[kind]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("runs", "data", "pred", "pred_merged", "merged", "demo", "sam2_instances"):
        shutil.rmtree(out / name, ignore_errors=True)  # a rerun into the same folder
    chk = Check(out, Path(args.summary).resolve() if args.summary else None, args.in_process)

    t0 = time.perf_counter()
    import westar_ops

    backends = westar_ops.available_backends(device)
    model = make_model(prof["arch"], out / f"model_{prof['arch']}")
    data = make_data(out / "data", prof["shapes"], prof["images"])
    chk.line("fixtures", 0, time.perf_counter() - t0,
             f"{prof['arch']}-sized model, {prof['images']} images {prof['shapes']}, {device}, "
             f"{args.precision}, ops backends {backends}")  # fmt: skip
    if kind == "cuda" and "cuda" not in backends:
        chk.line("cuda_ops", 1, 0.0, "westar_ops has no CUDA C++ kernels: the ops ran in Triton")

    steps, short = prof["steps"], prof["short_steps"]
    common = [
        "--model", str(model), "--data", str(data), "--image-size", str(prof["size"]),
        "--batch-size", str(prof["batch"]), "--mixed-precision", args.precision,
        "--num-workers", str(prof["workers"]), "--lr", "1e-3", "--log-every", "1",
        "--save-every", str(prof["save_every"]), "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    if kind == "cpu":
        common.append("--cpu")
    runs = out / "runs"
    straight, resumed = runs / "straight", runs / "resumed"
    run = chk.run

    run("train_straight", ["train", *common, "--steps", str(steps), "--output-dir", str(straight)])
    killed_args = ["train", *common, "--steps", str(steps), "--output-dir", str(resumed)]
    first_ckpt = resumed / "checkpoints" / f"step_{prof['save_every']:08d}"
    chk.run_killed("train_killed", killed_args, first_ckpt, args.kill_limit)
    run("train_resume", [*killed_args, "--resume"])
    resumed_at = _resumed_step(chk.logs / "train_resume.log")
    chk.results["train_resume"]["resumed_at"] = resumed_at
    after = range((resumed_at or 0) + 1, steps + 1)

    def resume_check():
        if resumed_at is None or not 0 < resumed_at < steps:
            return False, f"did not resume mid-run (step {resumed_at})", {}
        ok1, n1, x1 = compare_losses(straight, resumed, after, tol)
        ok2, n2, x2 = compare_adapters(straight / "adapter", resumed / "adapter", tol)
        return ok1 and ok2, f"from step {resumed_at}: {n1}; {n2}", {**x1, **x2}

    chk.check("check_resume", resume_check)

    accum, ckpt = runs / "accum", runs / "ckpt"
    short_args = ["train", *common, "--steps", str(short)]
    run("train_accum", [*short_args, "--grad-accum", "2", "--output-dir", str(accum)])
    chk.check("check_accum", lambda: check_finite_run(accum, short))
    # as many steps as the straight run: the cosine schedule depends on --steps
    run("train_ckpt", ["train", *common, "--steps", str(steps), "--gradient-checkpointing",
                       "--output-dir", str(ckpt)])  # fmt: skip
    chk.check("check_ckpt", lambda: compare_losses(straight, ckpt, range(1, steps + 1), tol))

    if "masks_sam2" not in args.skip:
        sam2 = make_sam2(out / "sam2", prof["sam2_side"])
        run("masks_sam2", ["masks", "--images", str(data / "images"), "--out",
                           str(out / "sam2_instances"), "--model", str(sam2), "--device", device,
                           "--points-per-side", "4"])  # fmt: skip

    adapter = straight / "adapter"
    run("eval", ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data),
                 "--which", "both", "--image-size", str(prof["size"]), "--max-depth", "20",
                 "--device", device, "--output", str(out / "eval.json")])  # fmt: skip
    chk.check("check_eval", lambda: check_eval(out / "eval.json"))
    predict_common = ["--image-size", str(prof["size"]), "--device", device, "--no-progress"]
    run("predict", ["predict", str(data / "images"), "--model", str(model), "--adapter",
                    str(adapter), "--out", str(out / "pred"), *predict_common])  # fmt: skip
    chk.check("check_predict", lambda: check_predict(data / "images", out / "pred"))
    run("merge", ["merge", "--model", str(model), "--adapter", str(adapter),
                  "--out", str(out / "merged")])  # fmt: skip
    run("predict_merged", ["predict", str(data / "images"), "--model", str(out / "merged"),
                           "--out", str(out / "pred_merged"), *predict_common])  # fmt: skip
    chk.check("check_merged", lambda: compare_predictions(out / "pred", out / "pred_merged"))
    if "demo" not in args.skip:
        run("demo", ["demo", "--quick", "--device", device, "--output", str(out / "demo"),
                     "--no-progress"])  # fmt: skip

    total = time.perf_counter() - t0
    verdict = "passed" if not chk.failed else f"FAILED ({', '.join(chk.failed)})"
    chk.line("trainer_stage", 0 if not chk.failed else 1, total, verdict)
    chk.failed = chk.failed[:-1] if chk.failed and chk.failed[-1] == "trainer_stage" else chk.failed
    (out / "train_check.json").write_text(json.dumps({
        "profile": args.profile, "device": device, "precision": args.precision,
        "tolerance": tol, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if kind == "cuda" else None,
        "results": chk.results,
    }, indent=1, default=str))  # fmt: skip
    return 0 if not chk.failed else 1


def _resumed_step(log: Path) -> int | None:
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith("westar: resumed from") and " at step " in line:
            return int(line.rsplit(" at step ", 1)[1].split()[0])
    return None


if __name__ == "__main__":
    sys.exit(main())
