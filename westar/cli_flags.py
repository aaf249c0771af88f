"""The one command-line vocabulary of `westar`: the same flag for the same meaning.

Every subcommand spells a shared concept the same way (as Hugging Face's tools do):

    --model        the depth model: a hub id, a folder, or "source" (the shipped model)
    --adapter      a peft adapter folder
    --data         a dataset root (images/, depth/, instances/, pairs.json)
    --images       a folder of images (or one image where a command takes one)
    --depth        a folder of ground-truth depth maps
    --instances    a folder of instance label maps
    --pairs        an ordinal pairs JSON file that is read
    --out          what a command writes: a folder or a file, per command
    --image-size   the inference / training image side, in pixels
    --device       cpu, cuda, cuda:1 ...
    --num-workers  worker processes
    --methods      rungs of the paper's ablation ladder (westar.config.LADDER)
    --corruption   one of westar.corrupt's corruptions (checked)
    --overwrite, --skip-bad, --no-progress, --seed

The earlier spellings (`--output`, `--output-dir`, `--images-dir`, `--size`, `--cpu`,
`--workers`, positional folders ...) still work for one release as hidden aliases that
print one deprecation line (`deprecated_alias`, `legacy_positional`).
tests/trainer/test_cli_vocabulary.py walks every parser and enforces this.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = [
    "HelpFormatter",
    "DeprecatedAlias",
    "deprecated_alias",
    "legacy_positional",
    "model_name",
    "MODEL_HELP",
    "DEVICE_HELP",
    "counted",
    "pick",
]

# Said in every --model help: what the name "source" is.
MODEL_HELP = (
    "depth model: hub id, local folder, or 'source' (the small model shipped with westar, "
    "trained on synthetic rooms only; real photographs need a Depth Anything V2 checkpoint)"
)
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)"
REMOVED_IN = "0.2"  # the release that drops the deprecated spellings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default: appends "(default: X)" unless the help already says it;
    a switch (store_true) shows "(default: off)"; a default of None must be explained in
    the help itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if not action.option_strings:  # positionals
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _warn(old: str, new: str) -> None:
    print(
        f"westar: {old} is deprecated and will be removed in {REMOVED_IN}; use {new}",
        file=sys.stderr,
    )


class DeprecatedAlias(argparse.Action):
    """A hidden earlier spelling of a flag: stores into the same dest and prints one
    deprecation line naming the new spelling. nargs=0 stores `const` (a switch)."""

    def __init__(self, option_strings, dest, new: str, nargs=None, const=None, **kwargs):
        kwargs["default"] = argparse.SUPPRESS  # never overrides the real flag's default
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        _warn(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated_alias(
    parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any
) -> None:
    """Accept `old` as a hidden alias of the flag `new` (same dest) for one release."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)


def legacy_positional(args: argparse.Namespace, name: str, dest: str, flag: str) -> None:
    """Move a deprecated positional argument (added with help=SUPPRESS, nargs="?", dest
    `name`) to the flag's dest, with a deprecation line; the flag wins when both are given.
    """
    value = getattr(args, name, None)
    if value is None:
        return
    _warn(f"the positional {name.upper()}", f"{flag} {name.upper()}")
    if getattr(args, dest, None) is None:
        setattr(args, dest, value)


def model_name(text: str) -> str:
    """argparse type of --model: "source" becomes the shipped model's folder; anything
    else (hub id or folder) passes unchanged (checked where the model is loaded)."""
    from westar.model import resolve_model_name

    return resolve_model_name(text)


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """{name: args.name} for the given names: flags passed on under their own names."""
    return {name: getattr(args, name) for name in names}


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """The count with its noun: 1 image, 2 images, 1 depth map, 3 depth maps."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
