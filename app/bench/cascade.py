"""The query cascade against every fixed submodel: 1-NN accuracy against mean GFLOPs and encode time per query.

    matvit bench cascade --index IDX --checkpoint DIR --dataset fashion-mnist --out docs/results/cascade-fmnist

Calibrates the cascade (`retrieval.cascade`: the cheapest chain of `--stages` and thresholds) on `--calibration`
images of `--split` (gallery images are left out of their own neighbours; with `test`, the cascade is evaluated
on the rest of the test split) for each `--target` share of XL's 1-NN accuracy, stores the first beside the
index, then evaluates each on the test split next to each fixed submodel:
1-NN accuracy, mean GFLOPs per query, and mean encode time per query measured through the retriever (`--timed`
queries, cascade and XL interleaved) at batch 1 and in batches of `--batch` (how a served index encodes
concurrent queries). Targets: at least the target share of XL's accuracy at no more than 60% of XL's GFLOPs
and of its encode time.
Writes cascade.json, cascade.md and cascade.png in OUT.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from matvit import provenance
from retrieval import cascade
from retrieval.retriever import Retriever

from .plots import cascade_png

COST_TARGET = 0.6  # the cascade's mean GFLOPs and encode time, as a share of XL's


def encode_ms(retriever: Retriever, images, policy: cascade.Policy, batch: int, rounds: int = 3) -> dict:
    """Mean encode milliseconds per query in batches of `batch` queries, cascade and XL alone, interleaved batch
    by batch; the median of `rounds` passes."""
    passes = {"cascade": [], "XL": []}
    for _ in range(rounds):
        totals = {"cascade": 0.0, "XL": 0.0}
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            runs = {"cascade": retriever.search_cascade(chunk, k=1, policy=policy),
                    "XL": retriever.search(chunk, k=1, submodel="XL")}
            for key, results in runs.items():
                totals[key] += results[0].timings_ms["encode"] * len(chunk)  # timings are per query
        for key, total in totals.items():
            passes[key].append(total / len(images))
    timed = {key: round(statistics.median(values), 4) for key, values in passes.items()}
    return {**timed, "batch": batch, "queries": len(images), "share_of_xl": round(timed["cascade"] / timed["XL"], 4)}


def evaluate(retriever: Retriever, policy: cascade.Policy, tested: list[cascade.Stage], timed_images,
             batch: int) -> dict:
    """One calibrated cascade on the test queries: accuracy, GFLOPs, stops, encode time at batch 1 and at
    `batch`, and its targets."""
    xl = tested[-1]
    outcome = cascade.simulate([s for s in tested if s.spec in policy.stages], policy.thresholds, policy.target, xl)
    share_accuracy = outcome["accuracy"] / float(xl.correct.mean())
    share_gflops = outcome["mean_gflops"] / xl.gflops
    timed = [encode_ms(retriever, timed_images, policy, b) for b in (1, batch)]
    return {"target": policy.target, "stages": policy.stages, "thresholds": policy.thresholds,
            "calibration": {k: v for k, v in policy.calibration.items() if k not in ("command", "commit", "machine")},
            "test": {**outcome, "share_of_xl_accuracy": share_accuracy, "share_of_xl_gflops": share_gflops},
            "encode_ms": timed,
            "targets": [
                {"what": "1-NN accuracy, share of XL's", "measured": round(share_accuracy, 4),
                 "target": f">= {policy.target}", "met": share_accuracy >= policy.target},
                {"what": "mean GFLOPs, share of XL's", "measured": round(share_gflops, 4),
                 "target": f"<= {COST_TARGET}", "met": share_gflops <= COST_TARGET},
                *({"what": f"mean encode time at batch {t['batch']}, share of XL's", "measured": t["share_of_xl"],
                   "target": f"<= {COST_TARGET}", "met": t["share_of_xl"] <= COST_TARGET} for t in timed)]}


def _take(queries: tuple, rows) -> tuple:
    """The (images, class names, sources) of `cascade.labelled` at `rows`."""
    images, truth, sources = queries
    return images[rows], [truth[i] for i in rows], [sources[i] for i in rows]


def run(args: argparse.Namespace) -> dict:
    """Calibrate a cascade per target (the first is stored beside the index), evaluate each on the test split."""
    retriever = Retriever(args.index, args.checkpoint, backend=args.backend)
    if args.backend == "auto":
        retriever.ensure_profile()  # auto's choices are made with the profile (measured here if it is stale)
    stages = args.stages.split(";")
    test = cascade.labelled(retriever, args.dataset, "test", data_dir=args.data_dir)
    if args.split == "test":  # calibrate on a seeded part of the test split, evaluate on the rest
        rows = np.random.default_rng(0).permutation(len(test[0]))
        queries, test = _take(test, np.sort(rows[:args.calibration])), _take(test, np.sort(rows[args.calibration:]))
    else:
        queries = cascade.labelled(retriever, args.dataset, args.split, args.calibration, args.data_dir)
    calibration = cascade.measure(retriever, *queries, stages, args.signal)
    policies = [cascade.calibrate(calibration, float(t), args.signal, retriever.encoder.fingerprint)
                for t in args.target.split(",")]
    policies[0].save(retriever.store.files / cascade.CASCADE_FILE)
    tested = cascade.measure(retriever, *test, stages, args.signal)
    report = {**provenance.record(), "dataset": args.dataset, "index": str(args.index),
              "checkpoint": str(args.checkpoint), "backends": {s: retriever.encoder.serving(s) for s in stages},
              "stages": stages, "signal": args.signal, "calibration_split": args.split,
              "calibration_queries": len(queries[0]),
              "test_queries": len(test[0]), "xl_accuracy": float(tested[-1].correct.mean()),
              "fixed": [{"spec": s.spec, "gflops": s.gflops, "accuracy": float(s.correct.mean())} for s in tested],
              "cascades": [evaluate(retriever, p, tested, test[0][:args.timed], args.batch) for p in policies]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.json").write_text(json.dumps(report, indent=2))
    (args.out / "cascade.md").write_text(markdown(report))
    cascade_png(report, COST_TARGET, args.out / "cascade.png")
    return report


def markdown(r: dict) -> str:
    timed = r["cascades"][0]["encode_ms"]
    if r["calibration_split"] == "test":
        calibrated_on, tested_on = "images of the test split (not in the gallery)", "other test queries"
    else:
        calibrated_on, tested_on = "gallery images (each left out of its own neighbours)", "test queries"
    lines = [f"# Query cascade: {r['dataset']}", "", f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}; "
             f"backends {', '.join(f'{s} {b}' for s, b in r['backends'].items())}", "",
             f"Candidate stages {', '.join(r['stages'])}. A cascade is a chain of them, cheapest first: a "
             f"query stops at the first stage whose {r['signal']} (for agreement: the share of its top "
             f"{cascade.VOTES} neighbours labelled like its top-1) reaches the stage's threshold, and pays for "
             f"every stage it ran. Each cascade (chain and thresholds) is calibrated on "
             f"{r['calibration_queries']:,} {calibrated_on} for its target share of XL's 1-NN accuracy at the least "
             f"mean GFLOPs, then run on the {r['test_queries']:,} {tested_on}. Encode time: mean per query over "
             f"{timed[0]['queries']} test queries at batch 1 and in batches of {timed[1]['batch']}, cascade and XL "
             "alone interleaved, median of 3 passes.", "",
             "| query encoder | thresholds | queries stopping at | mean GFLOPs | 1-NN | share of XL's 1-NN | "
             f"share of XL's GFLOPs | share of XL's encode time, batch 1 / {timed[1]['batch']} |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    xl = r["fixed"][-1]
    lines += [f"| {f['spec']} alone | | | {f['gflops']:.4f} | {f['accuracy']:.4f} | "
              f"{f['accuracy'] / xl['accuracy']:.4f} | {f['gflops'] / xl['gflops']:.3f} | |" for f in r["fixed"]]
    for c in r["cascades"]:
        t = c["test"]
        times = " / ".join(f"{e['share_of_xl']:.3f}" for e in c["encode_ms"])
        lines.append(f"| **cascade for {c['target']:.1%}**: {' -> '.join(c['stages'])} | "
                     f"{', '.join(f'{x:.2f}' for x in c['thresholds'])} | "
                     f"{', '.join(f'{s} {v:.1%}' for s, v in t['stops'].items())} | {t['mean_gflops']:.4f} | "
                     f"{t['accuracy']:.4f} | {t['share_of_xl_accuracy']:.4f} | {t['share_of_xl_gflops']:.3f} | "
                     f"{times} |")
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
    q.add_argument("--split", choices=["train", "test"], default="train",
                   help="where calibration images are drawn: the gallery's split (each is left out of its own "
                        "neighbours), or test (images the model did not train on: calibrate on part of it, evaluate "
                        "on the rest)")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--calibration", type=int, default=5000, help="calibration images")
    q.add_argument("--target", default="0.995,0.998,1.0",
                   help="shares of XL's 1-NN accuracy to calibrate for, separated by commas (the first is stored "
                        "beside the index and held to the targets)")
    q.add_argument("--stages", default="S;M;L;XL")
    q.add_argument("--signal", choices=cascade.SIGNALS, default="agreement")
    q.add_argument("--timed", type=int, default=320, help="test queries timed, one at a time and in batches")
    q.add_argument("--batch", type=int, default=64, help="queries per batch in the batched timing (a served index "
                                                         "encodes concurrent queries as one batch)")
    q.add_argument("--backend", default="eager", help="the query encoders' backend (see `matvit search`)")
    q.add_argument("--out", type=Path, required=True, help="results directory")
    q.set_defaults(func=run)
