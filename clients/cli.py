"""`dualfocus` (also `python -m clients`): the project's command line.

Each package brings its own subcommands; this module, above them all, assembles them, so
the packages import one another one way only (server -> engine; clients/python and
clients/eval -> neither). It lives in clients/ because it is what users run; it is the one
module that imports every package.
"""

from __future__ import annotations

import argparse
import sys

import clients.eval.cli
import clients.python.cli
import engine.cli
import server.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualfocus", description="DualFocus Serve: zoom-in VLM inference on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    engine.cli.add_parsers(sub)  # build-tiny, demo, convert-llava
    server.cli.add_parser(sub)  # serve
    clients.python.cli.add_parser(sub)  # ask
    clients.eval.cli.add_parser(sub)  # eval
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
