"""The query cascade against every fixed submodel: 1-NN accuracy against mean GFLOPs and encode time per query.

    matvit bench cascade --index IDX --checkpoint DIR --dataset fashion-mnist --out docs/results/cascade-fmnist

Calibrates the cascade (`retrieval.cascade`) on `--calibration` images of the gallery's split (each left out
of its own neighbours) for `--target` of XL's 1-NN accuracy and stores it beside the index, then evaluates it
on the test split next to each fixed submodel: 1-NN accuracy, mean GFLOPs per query, and mean encode time per
query measured through the retriever at batch 1 (`--timed` queries, cascade and XL interleaved). Targets:
at least `--target` of XL's accuracy at no more than 60% of XL's GFLOPs and of its encode time.
Writes cascade.json, cascade.md and cascade.png in OUT.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matvit import provenance
from retrieval import cascade
from retrieval.retriever import Retriever

from .plots import cascade_png

COST_TARGET = 0.6  # the cascade's mean GFLOPs and encode time, as a share of XL's


def encode_ms(retriever: Retriever, images, policy: cascade.Policy, rounds: int = 3) -> dict:
    """Mean encode milliseconds per query at batch 1, cascade and XL alone, interleaved query by query; the
    median of `rounds` passes."""
    passes = {"cascade": [], "XL": []}
    for _ in range(rounds):
        totals = {"cascade": 0.0, "XL": 0.0}
        for image in images:
            totals["cascade"] += retriever.search_cascade(image[None], k=1, policy=policy)[0].timings_ms["encode"]
            totals["XL"] += retriever.search(image[None], k=1, submodel="XL")[0].timings_ms["encode"]
        for key, total in totals.items():
            passes[key].append(total / len(images))
    return {key: round(statistics.median(values), 4) for key, values in passes.items()}


def evaluate(retriever: Retriever, policy: cascade.Policy, tested: list[cascade.Stage], timed_images) -> dict:
    """One calibrated cascade on the test queries: accuracy, GFLOPs, stops, encode time, and its targets."""
    outcome = cascade.simulate(tested, policy.thresholds)
    xl = tested[-1]
    share_accuracy = outcome["accuracy"] / float(xl.correct.mean())
    share_gflops = outcome["mean_gflops"] / xl.gflops
    timed = encode_ms(retriever, timed_images, policy)
    share_time = round(timed["cascade"] / timed["XL"], 4)
    return {"target": policy.target, "thresholds": policy.thresholds,
            "calibration": {k: v for k, v in policy.calibration.items() if k not in ("command", "commit", "machine")},
            "test": {**outcome, "share_of_xl_accuracy": share_accuracy, "share_of_xl_gflops": share_gflops},
            "encode_ms": {**timed, "queries": len(timed_images), "share_of_xl": share_time},
            "targets": [
                {"what": "1-NN accuracy, share of XL's", "measured": round(share_accuracy, 4),
                 "target": f">= {policy.target}", "met": share_accuracy >= policy.target},
                {"what": "mean GFLOPs, share of XL's", "measured": round(share_gflops, 4),
                 "target": f"<= {COST_TARGET}", "met": share_gflops <= COST_TARGET},
                {"what": "mean encode time, share of XL's", "measured": share_time, "target": f"<= {COST_TARGET}",
                 "met": share_time <= COST_TARGET}]}


def run(args: argparse.Namespace) -> dict:
    """Calibrate a cascade per target (the first is stored beside the index), evaluate each on the test split."""
    retriever = Retriever(args.index, args.checkpoint, backend=args.backend)
    if args.backend == "auto":
        retriever.ensure_profile()  # auto's choices are made with the profile (measured here if it is stale)
    stages = args.stages.split(";")
    images, truth, sources = cascade.labelled(retriever, args.dataset, args.split, args.calibration, args.data_dir)
    calibration = cascade.measure(retriever, images, truth, sources, stages, args.signal)
    policies = [cascade.calibrate(calibration, float(t), args.signal, retriever.encoder.fingerprint)
                for t in args.target.split(",")]
    policies[0].save(retriever.store.files / cascade.CASCADE_FILE)
    test_images, test_truth, test_sources = cascade.labelled(retriever, args.dataset, "test", data_dir=args.data_dir)
    tested = cascade.measure(retriever, test_images, test_truth, test_sources, stages, args.signal)
    report = {**provenance.record(), "dataset": args.dataset, "index": str(args.index),
              "checkpoint": str(args.checkpoint), "backends": {s: retriever.encoder.serving(s) for s in stages},
              "stages": stages, "signal": args.signal, "calibration_queries": len(images),
              "test_queries": len(test_images), "xl_accuracy": float(tested[-1].correct.mean()),
              "fixed": [{"spec": s.spec, "gflops": s.gflops, "accuracy": float(s.correct.mean())} for s in tested],
              "cascades": [evaluate(retriever, p, tested, test_images[:args.timed]) for p in policies]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.json").write_text(json.dumps(report, indent=2))
    (args.out / "cascade.md").write_text(markdown(report))
    cascade_png(report, COST_TARGET, args.out / "cascade.png")
    return report


def markdown(r: dict) -> str:
    lines = [f"# Query cascade: {r['dataset']}", "", f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}; "
             f"backends {', '.join(f'{s} {b}' for s, b in r['backends'].items())}", "",
             f"Stages {' -> '.join(r['stages'])}: a query stops at the first stage whose {r['signal']} (the share of "
             f"its top {cascade.VOTES} neighbours labelled like its top-1) reaches the stage's threshold. Each cascade "
             f"is calibrated on {r['calibration_queries']:,} gallery images (each left out of its own neighbours) for "
             f"its target share of XL's 1-NN accuracy, then run on the {r['test_queries']:,} test queries. Encode "
             "time: mean per query at batch 1, cascade and XL alone interleaved, median of 3 passes.", "",
             "| query encoder | thresholds | stops at S / M / L / XL | mean GFLOPs | 1-NN | share of XL's 1-NN | "
             "share of XL's GFLOPs | share of XL's encode time |", "|---|---|---|---:|---:|---:|---:|---:|"]
    xl = r["fixed"][-1]
    lines += [f"| {f['spec']} alone | | | {f['gflops']:.4f} | {f['accuracy']:.4f} | "
              f"{f['accuracy'] / xl['accuracy']:.4f} | {f['gflops'] / xl['gflops']:.3f} | |" for f in r["fixed"]]
    for c in r["cascades"]:
        t = c["test"]
        lines.append(f"| **cascade for {c['target']:.1%}** | {', '.join(f'{x:.2f}' for x in c['thresholds'])} | "
                     f"{' / '.join(f'{v:.1%}' for v in t['stops'].values())} | {t['mean_gflops']:.4f} | "
                     f"{t['accuracy']:.4f} | {t['share_of_xl_accuracy']:.4f} | {t['share_of_xl_gflops']:.3f} | "
                     f"{c['encode_ms']['share_of_xl']:.3f} |")
    first = r["cascades"][0]
    lines += ["", f"Targets, for the cascade stored beside the index ({first['target']:.1%} of XL):", "",
              "| target | measured | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {x['what']} | {x['measured']} | {x['target']} | {'yes' if x['met'] else '**no**'} |"
              for x in first["targets"]]
    lines += ["", "![accuracy against mean GFLOPs](cascade.png)", ""]
    return "\n".join(lines)


def add_parser(bench_subparsers) -> None:
    """Register `matvit bench cascade` under the `bench` subcommand's subparsers."""
    q = bench_subparsers.add_parser("cascade", help="the query cascade against each fixed submodel: accuracy, "
                                                    "mean GFLOPs and encode time")
    q.add_argument("--index", type=Path, required=True, help="an XL index of the dataset's gallery split")
    q.add_argument("--checkpoint", type=Path, required=True)
    q.add_argument("--dataset", required=True)
    q.add_argument("--split", default="train", help="the gallery's split, where calibration images are drawn")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--calibration", type=int, default=5000, help="calibration images")
    q.add_argument("--target", default="0.995,0.998,1.0",
                   help="shares of XL's 1-NN accuracy to calibrate for, separated by commas (the first is stored "
                        "beside the index and held to the targets)")
    q.add_argument("--stages", default="S;M;L;XL")
    q.add_argument("--signal", choices=cascade.SIGNALS, default="agreement")
    q.add_argument("--timed", type=int, default=300, help="test queries timed one at a time")
    q.add_argument("--backend", default="eager", help="the query encoders' backend (see `matvit search`)")
    q.add_argument("--out", type=Path, required=True, help="results directory")
    q.set_defaults(func=run)
