"""The `matvit` command line. It parses options and calls the library; no model logic lives here.

One module per command group, each holding its commands and their parsers: `train` (train, induce, export), `index`
(build-index, index add / remove / rebuild / info), `search` (search, cascade, profile, eval-grid), `serve` (serve,
demo) and `bench` (the benchmarks). A command imports what it needs when it runs, so building the parser stays
light (no plotting, ONNX, Milvus, web or demo libraries)."""

from __future__ import annotations

import argparse
import logging
import sys

from matvit import provenance
from matvit.errors import UserError

from . import bench, index, search, serve, train

GROUPS = (train, index, search, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matvit",
                                     description="Adaptive image retrieval on nested models (MatViT, MatMamba).")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    provenance.set_command(["matvit", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except UserError as e:
        print(f"matvit: error: {e}", file=sys.stderr)
        return 2
    return 0
