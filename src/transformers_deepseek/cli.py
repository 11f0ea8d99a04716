"""`transformers-deepseek` command line. Subcommands are added by the subpackages that own them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from transformers_deepseek import __version__
    from transformers_deepseek.conversion.cli import add_convert_parser
    from transformers_deepseek.publishing import add_push_parser

    parser = argparse.ArgumentParser(prog="transformers-deepseek", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_convert_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args))


if __name__ == "__main__":
    raise SystemExit(main())
