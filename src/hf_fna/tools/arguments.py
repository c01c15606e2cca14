"""The FNA settings as command-line options, generated from the fields of `FNAConfig`: every command that takes them
(`compare`, `inspect`, `eval`, `push-config`) gets the same names, types, choices and help.

An option left out is absent from `fna_overrides(args)`, so the model's own `fna_config` (or the defaults) keeps that
setting.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from typing import Any, Literal

from ..config import FNAConfig, field_help
from ..schedules import parse_layers

FNA_OPTIONS = ("layers", "num_landmarks", "min_tokens", "sampling", "pinv")
# Earlier spellings, still accepted so that recorded command lines keep working.
_ALIASES = {"num_landmarks": ("--landmarks",)}


def add_fna_arguments(
    parser: argparse.ArgumentParser,
    names: Sequence[str] = FNA_OPTIONS,
    config_file: bool = False,
    config_file_aliases: Sequence[str] = (),
) -> argparse._ArgumentGroup:
    """Add an "FNA settings" group with one option per `FNAConfig` field in `names` (`--num-landmarks` for
    `num_landmarks`...), and `--fna-config PATH` when `config_file`."""
    group = parser.add_argument_group(
        "FNA settings", "default: the model's fna_config, else the FNAConfig defaults; options given replace them"
    )
    if config_file:
        group.add_argument(
            "--fna-config",
            *config_file_aliases,
            metavar="PATH",
            help="fna_config.json, a folder holding one, or a Hub repo id",
        )
    hints, helps = typing.get_type_hints(FNAConfig), field_help()
    for name in names:
        hint = hints[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": helps[name]}
        if name == "layers":
            kwargs.update(nargs="+", metavar="LAYERS")
            kwargs["help"] += ": 'auto', 'all', 'none', a slice '6:', indices '6 7 8' or groups '4:6@256;6:@64'"
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint is int or int in typing.get_args(hint):
            kwargs.update(type=int, metavar="N")
        group.add_argument(f"--{name.replace('_', '-')}", *_ALIASES.get(name, ()), **kwargs)
    return group


def fna_overrides(args: argparse.Namespace, names: Sequence[str] = FNA_OPTIONS) -> dict[str, Any]:
    """The settings given on the command line, as `FNAConfig` field values (`--layers` parsed).

    Raises:
        InputError: a `--layers` value that is not a layer specification.
    """
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "layers":
            value = parse_layers(value)
        out[name] = value
    return out
