"""Issue 22: a README that holds on any machine, and commands in it that parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from westar.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _readme_commands() -> list[str]:
    """Every `westar ...` line of the README's bash blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("westar "):
                commands.append(line)
    return commands


def test_readme_has_westar_commands():
    assert len(_readme_commands()) >= 10


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_commands_parse_in_the_current_vocabulary(command, capsys):
    argv = shlex.split(command)[1:]
    build_parser().parse_args(argv)  # SystemExit (exit 2) on an unknown flag
    assert "deprecated" not in capsys.readouterr().err, command


def test_browser_tests_can_run_from_the_test_extra():
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = extra["optional-dependencies"]["test"]
    assert any(r.startswith("selenium") for r in extra)
    assert "chromium chromium-driver" in README  # the Debian packages, named


def test_readme_says_what_happens_to_tests_gpu():
    conftest = (ROOT / "tests" / "gpu" / "conftest.py").read_text()
    assert "collect_ignore" in conftest  # not collected without a GPU ...
    assert "not even collected" in README  # ... and the README says so
    assert "is skipped otherwise" not in README


def test_readme_names_the_cpu_wheel():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README


def test_readme_promises_no_identical_demo_numbers():
    # no "before -> after" AbsRel / delta1 pairs quoted as if every machine printed them
    assert not re.search(r"\d\.\d{3,4} / \d\.\d{3,4}", README)
    assert "not identical" in README
