"""Issue 22: one command-line vocabulary. Walks every subcommand's parser and fails on a
second spelling of a shared concept, a flag without help or without its default, a flag
that is a switch in one command and takes a value in another, and on deprecated spellings
that stop working or stop saying so."""

from __future__ import annotations

import argparse

import pytest

from westar.cli import build_parser

# Written here, not imported: the spellings a user met before issue 22 and must not meet
# again (concept -> the one spelling -> spellings that must not be visible).
SECOND_SPELLINGS = {
    "output": ("--out", {"--output", "--output-dir", "--out-dir", "--outdir", "--dst"}),
    "images": ("--images", {"--images-dir", "--image-dir", "--input", "--src", "--root"}),
    "depth": ("--depth", {"--depth-dir", "--gt"}),
    "instances": ("--instances", {"--instances-dir", "--masks-dir"}),
    "pairs": ("--pairs", {"--pairs-file", "--pairs-json"}),
    "image size": ("--image-size", {"--size", "--img-size", "--resolution"}),
    "device": ("--device", {"--cpu", "--gpu", "--cuda"}),
    "workers": ("--num-workers", {"--workers", "--jobs", "--processes"}),
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in p._actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]


SUBCOMMANDS = _subparsers()


def test_every_command_is_walked():
    assert {"train", "eval", "predict", "corrupt", "demo", "bench", "sweep", "masks",
            "pairs", "merge", "annotate"} <= set(SUBCOMMANDS)  # fmt: skip


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_no_second_spelling_and_no_positional(name):
    bad = set().union(*(wrong for _, wrong in SECOND_SPELLINGS.values()))
    for action in _visible(SUBCOMMANDS[name]):
        assert action.option_strings, f"{name}: positional {action.dest}: use a named flag"
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: one switch
            long_flags = long_flags[:1]
        assert len(long_flags) == 1, f"{name}: {long_flags}: two visible spellings"
        assert not bad & set(action.option_strings), f"{name}: {action.option_strings}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_flag_has_one_line_help_and_its_default(name):
    p = SUBCOMMANDS[name]
    formatter = p._get_formatter()
    for action in _visible(p):
        flag = action.option_strings[0]
        assert action.help and action.help.strip(), f"{name} {flag}: no help"
        text = formatter._expand_help(action) if action.help else ""
        assert "\n" not in text, f"{name} {flag}: help is not one line"
        said = "(default" in text or "default:" in text or "required" in text
        assert said or action.required, f"{name} {flag}: help does not give the default"
        assert not text.rstrip().endswith(("keep", "the", "a", "of")), f"{name} {flag}: cut off"
    help_text = p.format_help()  # renders (the % formatting of every help works)
    assert "(default: )" not in help_text


def test_a_shared_flag_is_the_same_kind_everywhere():
    """A switch in one command is a switch in all; choices checked in one are checked in
    all (demo --corruption took any text while corrupt checked)."""
    kinds: dict[str, dict[str, tuple]] = {}
    for name, p in SUBCOMMANDS.items():
        for a in _visible(p):
            for flag in a.option_strings:
                switch = a.nargs == 0
                kinds.setdefault(flag, {})[name] = (switch, a.choices is not None)
    mixed = {f: seen for f, seen in kinds.items() if len(set(seen.values())) > 1}
    # --device: train checks its three values itself (Accelerate takes cpu/cuda only)
    mixed.pop("--device", None)
    assert not mixed, mixed


# (command line with the old spelling, the attribute, the value it must land in)
OLD_SPELLINGS = [
    (["train", "--output-dir", "r"], "output_dir", "r"),
    (["train", "--images-dir", "i"], "images_dir", "i"),
    (["train", "--instances-dir", "m"], "instances_dir", "m"),
    (["train", "--pairs-file", "p.json"], "pairs_file", "p.json"),
    (["train", "--depth-dir", "d"], "depth_dir", "d"),
    (["train", "--cpu"], "device", "cpu"),
    (["eval", "--model", "m", "--output", "e.json"], "out", "e.json"),
    (["eval", "--model", "m", "--size", "70"], "size", 70),
    (["demo", "--output", "o"], "out", "o"),
    (["demo", "--ablation"], "methods", ["all"]),
    (["corrupt", "--depth-dir", "d"], "depth", "d"),
    (["bench", "--workers", "3"], "num_workers", "3"),
    (["bench", "--root", "r"], "data", "r"),
    (["annotate", "--images", "i", "--out", "p", "--size", "70"], "size", 70),
]


@pytest.mark.parametrize("argv,dest,value", OLD_SPELLINGS, ids=lambda v: str(v))
def test_old_spellings_work_and_say_they_are_deprecated(argv, dest, value, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deprecated" in err
    new = {"--cpu": "--device cpu", "--ablation": "--methods all"}
    old = next(a for a in argv if a.startswith("--") and a not in ("--model", "--images"))
    assert new.get(old, "--") in err


@pytest.mark.parametrize(
    "argv,dest,value",
    [
        (["predict", "photos", "--model", "m", "--out", "o"], "images", "photos"),
        (["corrupt", "src", "dst"], "images", "src"),
        (["corrupt", "src", "dst"], "out", "dst"),
    ],
)
def test_old_positionals_still_work(argv, dest, value, capsys):
    from westar.cli_flags import legacy_positional

    args = build_parser().parse_args(argv)
    for name, to in (("input", "images"), ("src", "images"), ("dst", "out")):
        if hasattr(args, name):
            legacy_positional(args, name, to, "--" + to)
    assert getattr(args, dest) == value
    assert "deprecated" in capsys.readouterr().err


def test_new_spellings_are_quiet(capsys):
    build_parser().parse_args(["train", "--out", "r", "--images", "i", "--device", "cpu"])
    assert capsys.readouterr().err == ""


def test_train_device_maps_to_the_config():
    from westar.cli import config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--device", "cpu"])).cpu is True
    assert config_from_args(parse(["train", "--device", "cuda"])).cpu is False
    with pytest.raises(ValueError, match="--device"):
        config_from_args(parse(["train", "--device", "tpu"]))


def test_train_has_a_help_line_for_every_config_field():
    import dataclasses

    from westar.config import TrainConfig
    from westar.train_flags import HELP

    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in HELP]
    assert not missing, f"TrainConfig fields without a help line: {missing}"
