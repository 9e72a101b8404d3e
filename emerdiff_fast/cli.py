"""Command line: `emerdiff-fast segment | eval | scenes | hyperfeatures ...`.

This module only assembles the subcommands (commands/, evaluate.py, hyperfeatures/cli.py)
and sets up logging. Each failure is one line on stderr. Exit status: 0 all done, 1 some
images failed (the others were written), 2 bad usage or setup, 130 interrupted (finished
outputs are complete: every file is written atomically).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, evaluate
from .commands import scenes, segment
from .commands.common import UsageError
from .hyperfeatures import cli as hyperfeatures_cli

log = logging.getLogger("emerdiff_fast")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False of flags and unset options."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(level: str) -> None:
    """Our messages at `level`; third-party libraries' (transformers' torchvision notes,
    diffusers' dtype notes, Python warnings) only at debug level."""
    verbose = level == "debug"
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def make_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="emerdiff-fast", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (segment, scenes, evaluate, hyperfeatures_cli):
        command.add_parser(sub, fmt)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.log_level)
    from .config import ConfigError
    from .datasets import DatasetError
    from .loading import ModelLoadError

    try:
        return args.func(args)
    except (UsageError, ModelLoadError, ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
