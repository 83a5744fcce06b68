"""The `edgeshort` command. Imports stay lazy: `edgeshort --help` does not import torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from edgeshort._version import __version__

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "demo": ("edgeshort.commands.demo", "run the whole chain on the built-in synthetic data and tiny ViT"),
    "detect": ("edgeshort.commands.detect", "find the shortcut a ViT learned on a labelled validation set"),
    "export": ("edgeshort.commands.export", "export a detection run to an ONNX + OpenVINO bundle"),
    "predict": ("edgeshort.commands.predict", "guarded predictions from a bundle: JSONL/CSV and overlay PNGs"),
    "bench": ("edgeshort.commands.bench", "measure latency, throughput, memory and size of a bundle"),
    "spray": ("edgeshort.spray.cli", "SpRAy: cluster explanation heatmaps and flag Clever Hans clusters"),
    "report": ("edgeshort.commands.report", "HTML report of a detection run: verdict, heatmaps, flags, group accuracy"),
    "env": ("edgeshort.commands.env", "print versions, backends and devices (for bug reports)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `only` command's arguments are loaded (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="edgeshort",
        description="Find the shortcuts a Vision Transformer has learned and ship a guarded model to the edge.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"edgeshort {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen command's module is imported, so --help stays light.
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from edgeshort._optional import missing_extra
    from edgeshort.errors import EdgeshortError

    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (EdgeshortError, FileNotFoundError) as exc:
        print(f"edgeshort {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ImportError as exc:  # an offline command on a runtime-only install
        if (missing := missing_extra(exc)) is None:
            raise
        print(f"edgeshort {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        # Python's advice: point stdout at devnull so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
