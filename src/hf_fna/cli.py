"""The `hf-fna` command line: `compare` (the main job), `inspect`, `eval`, `push-config` and `calibrate`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs. Expected failures (any `hf_fna.errors.FNAError`: a bad option, a model that
cannot be loaded, a path that cannot be written) print one line and exit with status 2, without a traceback, and so
does a missing optional dependency, naming the extra that installs it (`pip install 'hf-fna[eval]'`); Ctrl-C, at
start-up as later, prints one line and exits with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hf_fna import __version__
from hf_fna.errors import FNAError
from hf_fna.extras import missing_extra

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "compare": (
        "hf_fna.tools.compare",
        "exact vs FNA attention on a real model: speed and fidelity at several resolutions",
    ),
    "inspect": (
        "hf_fna.tools.inspection",
        "massive/artifact tokens per layer, with norm maps and the chosen landmarks",
    ),
    "eval": ("hf_fna.evaluation.cli", "task metrics (classification, retrieval, segmentation, VQA), exact vs FNA"),
    "push-config": ("hf_fna.tools.publish", "write fna_config.json and a model card, and upload them to a Hub repo"),
    "calibrate": ("hf_fna.tools.calibration", "find the fastest per-layer FNA schedule that meets a fidelity target"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = f"hf-fna {argv[0]}" if argv[:1] and argv[0] in SUBCOMMANDS else "hf-fna"
    try:  # Ctrl-C while the subcommand's imports load (seconds: torch, transformers) is an interruption too
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-fna", description="Fast Nyström Attention for Hugging Face ViTs.")
    parser.add_argument("--version", action="version", version=f"hf-fna {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Only the chosen subcommand's module is imported (they pull in datasets, sklearn, matplotlib...).
        if argv[:1] == [name]:
            try:
                importlib.import_module(module_name).add_arguments(sub)
            except ImportError as error:
                return _missing(name, error)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except ImportError as error:
        return _missing(args.command, error)
    except FNAError as error:
        print(f"hf-fna {args.command}: error: {error}", file=sys.stderr)
        return 2


def _missing(command: str, error: ImportError) -> int:
    """Report a missing optional dependency as one line naming its extra (status 2); re-raise any other."""
    line = missing_extra(error)
    if line is None:
        raise error
    print(f"hf-fna {command}: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
