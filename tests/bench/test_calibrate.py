"""The calibration's severity picker (synthetic numbers) and `westar bench --calibrate`."""

from __future__ import annotations

import json
import math

from westar.bench import frozen as D
from westar.bench.calibrate import pick_severities, severities_line
from westar.cli import main

CLEAN = {"abs_rel": 0.10, "delta1": 0.90}


def _m(abs_rel, delta1):
    return {"abs_rel": abs_rel, "delta1": delta1}


def test_picker_takes_the_smallest_severity_meeting_either_criterion():
    table = {
        # AbsRel ratio: 1.2, 1.49 (no), 1.5 (yes), ...
        "by_ratio": {1: _m(0.12, 0.9), 2: _m(0.149, 0.9), 3: _m(0.15, 0.9), 4: _m(0.3, 0.5)},
        # delta1 drop: 5, 9.9 (no), 10 points (yes), with AbsRel barely moving
        "by_delta1": {1: _m(0.10, 0.85), 2: _m(0.101, 0.801), 3: _m(0.102, 0.80)},
        "never": {s: _m(0.11, 0.88) for s in range(1, 6)},
        # unordered and string keys (as read back from calibration.json)
        "json_keys": {"5": _m(0.5, 0.2), "2": _m(0.2, 0.9), "1": _m(0.1, 0.9)},
    }
    assert pick_severities(CLEAN, table) == {
        "by_ratio": 3,
        "by_delta1": 3,
        "never": "none",
        "json_keys": 2,
    }


def test_severities_line_is_python_and_flags_none():
    line = severities_line({"fog": 2, "jpeg": "none"})
    assert line.startswith('SEVERITIES = {"fog": 2, "jpeg": 5}')
    assert "none meets the criterion: jpeg" in line
    namespace: dict = {}
    exec(line, namespace)  # the line a human pastes into definition.py
    assert namespace["SEVERITIES"] == {"fog": 2, "jpeg": 5}


def test_calibrate_cli_quick_writes_the_table_and_changes_nothing(tmp_path, capsys):
    before = dict(D.SEVERITIES)
    source = (D.__file__, open(D.__file__).read())
    rc = main(["bench", "--calibrate", "--quick", "--out", str(tmp_path), "--no-progress",
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert set(report["table"]) == set(D.CALIBRATED_CORRUPTIONS)
    for by_sev in report["table"].values():
        assert sorted(by_sev) == ["1", "2", "3", "4", "5"]
        for m in by_sev.values():
            assert math.isfinite(m["abs_rel"]) and 0 <= m["delta1"] <= 1
    assert report["scene_seeds"][0] == D.calibration_seeds().start
    for corr, sev in report["chosen"].items():
        meets = [int(s) for s, m in report["table"][corr].items() if m["meets"]]
        assert sev == (min(meets) if meets else "none")
    md = (tmp_path / "calibration.md").read_text()
    assert "SEVERITIES = {" in md and md.count("\n| ") == 1 + 5 * len(D.CALIBRATED_CORRUPTIONS)
    assert D.SEVERITIES == before and open(source[0]).read() == source[1]
