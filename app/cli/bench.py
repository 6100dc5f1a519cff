"""`matvit bench`: the benchmarks users run. Each benchmark module registers its own subcommand with
`add_parser(bench_subparsers)`, which sets its handler; `BENCHMARKS` lists them, in `--help`'s order. The research
studies are not here: they live in scripts/studies/, each run as `python -m scripts.studies.NAME`."""

from __future__ import annotations

import argparse

from app.bench import cascade, consistency, dims, index_scale, speed

BENCHMARKS = (consistency, dims, index_scale, speed, cascade)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the `bench` group and every benchmark of `BENCHMARKS` under it."""
    p = sub.add_parser("bench", help="benchmarks")
    bench_subparsers = p.add_subparsers(dest="bench_command", required=True)
    for benchmark in BENCHMARKS:
        benchmark.add_parser(bench_subparsers)
