"""Fixtures for the annotate tests: image folders, a server process, a headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,760",
)  # fmt: skip


def make_image_folder(root: Path, n: int = 3, size=(96, 128), seed: int = 0) -> Path:
    """<root>/images/img_00k.png rendered scenes and <root>/depth/img_00k.npy their depth."""
    from westar.synth import SceneParams, render_scene

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "depth").mkdir(parents=True, exist_ok=True)
    params = SceneParams(height=size[0], width=size[1])
    for i in range(n):
        scene = render_scene(seed + i, params)
        Image.fromarray(scene.image).save(root / "images" / f"img_{i:03d}.png")
        np.save(root / "depth" / f"img_{i:03d}.npy", scene.depth)
    return root


class ServerProcess:
    """`python -m westar annotate ... --port 0` in a subprocess; .url once it listens."""

    def __init__(self, images: Path, out: Path, *extra: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "westar", "annotate", "--images", str(images),
               "--out", str(out), "--port", "0", *extra]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"open (http://\S+) in a browser", line)
            if m:
                self.url = m.group(1)
                return
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        self.stop()
        raise RuntimeError(f"server did not start: {''.join(self.lines)} {err}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, as when the machine or the terminal dies."""
        self.proc.kill()
        self.proc.wait()
        self.stop()


def browser_available() -> str | None:
    """None if the tests can drive Chromium here, else the reason."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).is_file():
            return f"{exe} not found (apt-get install chromium chromium-driver)"
    return None


def make_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
