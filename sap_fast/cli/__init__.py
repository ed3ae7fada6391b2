"""The ``sap-fast`` command (also ``python -m sap_fast``).

    sap-fast demo      the embedded digits demo (noisy labels → SAP), with report.png/report.json
    sap-fast correct   correct your own model from a folder of images or a .pt file
    sap-fast compare   SAP beside Finetune, SSD, SCRUB, GA, RL, UGradSL(+), ManiF-SMC on the digits
    sap-fast bench     the benchmark suite that fits this machine
    sap-fast info      what was built, and each stage's choice with the skipped implementations' reasons

Errors in what was asked (bad paths, unreadable checkpoints, class counts that do not match, a
model the data do not fit, bad options) print one line and exit with status 2; anything else
exits with 1 (``--traceback`` shows it in full); Ctrl-C exits with 130.

One module per command (:mod:`.demo`, :mod:`.correct`, :mod:`.compare`, :mod:`.bench`), each
with ``add_arguments(parser)`` and ``run(args)``; :mod:`.load` reads models and data,
:mod:`.report` writes ``report.json``/``report.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from .._runtime.checks import first_line
from .._runtime.forward import set_progress
from ..backends.info import backend_info, format_choices
from . import bench, compare, correct, demo
from .load import LoadError

__all__ = ["USAGE_ERRORS", "COMMANDS", "build_parser", "main"]

USAGE_ERRORS = (LoadError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError)

COMMANDS = {  # name: (module, one-line help)
    "demo": (demo, "digits with label noise, repaired by SAP"),
    "correct": (correct, "correct your own model"),
    "compare": (compare, "SAP beside the other correctors (digits)"),
    "bench": (bench, "benchmarks that fit this machine"),
}


def _info(args: argparse.Namespace) -> int:
    info = backend_info()
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_choices(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sap-fast", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars (they are on by default)")
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{" + ",".join([*COMMANDS, "info"]) + "}")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=module.__doc__.split("\n\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    info = commands.add_parser("info", parents=[common], help="what was built and what each stage uses",
                               description="What was built, and for each stage and device type the "
                               "implementation its chooser picks for representative calls, with every "
                               "skipped implementation's reasons.")
    info.add_argument("--json", action="store_true", help="print sap_fast.backend_info() as JSON instead")
    info.set_defaults(run=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = set_progress(not args.quiet)  # bars on every pass over data (images/s, ETA), on stderr
    threads = torch.get_num_threads()  # a command may set its own; a caller of main() keeps theirs
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"sap-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, unless asked for the whole story
        if args.traceback:
            raise
        print(f"sap-fast {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, USAGE_ERRORS) else 1
    finally:
        set_progress(previous)
        torch.set_num_threads(threads)
