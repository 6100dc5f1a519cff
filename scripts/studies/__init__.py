"""Research studies: the measurements behind the training recipe and the design choices, kept apart from the product.

Each study is a module run from the repository root as `python -m scripts.studies.NAME ...`, with its own parser
(`build_parser()`) and `main(argv)`. Studies import the product (`matvit/`, `retrieval/`, `app/bench/`'s helpers);
nothing of the product imports a study. What each study found is in docs/results/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from matvit import provenance
from matvit.errors import UserError


def make_parser(module: str, description: str) -> argparse.ArgumentParser:
    """A study's parser, named after how it is run (`python -m MODULE`)."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description)


def run(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], object],
        argv: list[str] | None = None) -> int:
    """Parse `argv` (default: this process's arguments), record the command line in the results' provenance and run
    `handler`; an error the user can fix is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    provenance.set_command([*parser.prog.split(), *argv])
    try:
        handler(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
