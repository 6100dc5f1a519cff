"""The query cascade against every fixed submodel: 1-NN accuracy against mean GFLOPs and encode time per query.

    matvit bench cascade --index IDX --checkpoint DIR --dataset fashion-mnist --out docs/results/cascade-fmnist

Calibrates the cascade (`retrieval.cascade`: the cheapest chain of `--stages` and thresholds) on `--calibration`
images of `--split` (gallery images are left out of their own neighbours; with `test`, the cascade is evaluated
on the rest of the test split) for each `--target` share of XL's 1-NN accuracy, stores the first beside the
index, then evaluates each on the test split next to each fixed submodel and every monotone Mix'n'Match spec:
1-NN accuracy, mean GFLOPs per query, and mean encode time per query measured through the retriever (`--timed`
queries, cascade and XL interleaved) at batch 1 and in batches of `--batch` (how a served index encodes
concurrent queries), and the same stops replayed on an untrained model of the `--replay` preset's shape (a
small model's time is mostly per-layer overhead; a 224 px one's follows its FLOPs). Targets: at least the
target share of XL's accuracy at no more than 60% of XL's GFLOPs and of its encode time.
Writes cascade.json, cascade.md and cascade.png in OUT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from matvit import provenance
from matvit import spec as specs
from matvit.model import MatViT
from matvit.registry import get_preset
from retrieval import cascade
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever

COST_TARGET = 0.6  # the cascade's mean GFLOPs and encode time, as a share of XL's


def timed_passes(queries: int, batch: int, time_chunk: Callable[[slice], dict], rounds: int = 3) -> dict:
    """Mean milliseconds per query of the cascade and of XL alone, `time_chunk(rows)` timing both on each
    batch of `batch` queries in turn; the median of `rounds` passes."""
    passes = {"cascade": [], "XL": []}
    for _ in range(rounds):
        totals = dict.fromkeys(passes, 0.0)
        for start in range(0, queries, batch):
            for key, ms in time_chunk(slice(start, start + batch)).items():
                totals[key] += ms
        for key, total in totals.items():
            passes[key].append(total / queries)
    timed = {key: round(statistics.median(values), 4) for key, values in passes.items()}
    return {**timed, "batch": batch, "queries": queries, "share_of_xl": round(timed["cascade"] / timed["XL"], 4)}


def encode_ms(retriever: Retriever, images, policy: cascade.Policy, batch: int) -> dict:
    """Encode time per query through the retriever, the cascade's and XL's alone."""
    def time_chunk(rows: slice) -> dict:
        chunk = images[rows]
        runs = {"cascade": retriever.search_cascade(chunk, k=1, policy=policy),
                "XL": retriever.search(chunk, k=1, submodel="XL")}
        return {key: results[0].timings_ms["encode"] * len(chunk) for key, results in runs.items()}  # per query
    return timed_passes(len(images), batch, time_chunk)


def replay_ms(preset: str, chain: list[str], stop: np.ndarray, batch: int, backend: str) -> dict:
    """Encode time per query of the cascade's stops (`stop`: per query, the index in `chain` of its last stage)
    replayed on an untrained MatViT of a `preset`'s shape served as the retriever serves it (extracted
    submodels, `backend`), and of XL alone on it: a forward pass costs the same whatever its weights, so this
    is what the same stops cost on a larger model, whose time follows its FLOPs."""
    torch.manual_seed(0)
    shape = get_preset(preset).model
    encoder = Encoder(MatViT(shape), backend=backend)
    runners = {spec: encoder.runner(spec) for spec in {*chain, "XL"}}
    images = torch.randn(min(batch, len(stop)), shape.in_chans, shape.img_size, shape.img_size)

    def time_chunk(rows: slice) -> dict:
        last = torch.from_numpy(stop[rows])
        t0 = time.perf_counter()
        for i, spec in enumerate(chain):
            if (last >= i).any():
                runners[spec](images[:len(last)][last >= i])
        t1 = time.perf_counter()
        runners["XL"](images[:len(last)])
        return {"cascade": (t1 - t0) * 1e3, "XL": (time.perf_counter() - t1) * 1e3}
    for run in runners.values():
        run(images)  # warm-up
    return timed_passes(len(stop), batch, time_chunk)


def share_interval(correct: np.ndarray, xl_correct: np.ndarray) -> list[float]:
    """The 95% interval of mean(correct) / mean(xl_correct) over paired queries (delta method)."""
    share = correct.mean() / xl_correct.mean()
    half = 1.96 * (correct - share * xl_correct).std() / np.sqrt(len(correct)) / xl_correct.mean()
    return [round(float(share - half), 4), round(float(share + half), 4)]


def evaluate(retriever: Retriever, policy: cascade.Policy, tested: list[cascade.Stage], timed_images,
             batch: int, replay: str | None) -> dict:
    """One calibrated cascade on the test queries: accuracy (with its 95% interval), GFLOPs, stops, encode time
    at batch 1 and at `batch` (and replayed on the `replay` preset's shape), and its targets."""
    groups = cascade.by_search(tested)
    xl = groups[None][-1]
    chain = [s for s in groups[policy.plan] if s.spec in policy.stages]
    outcome = cascade.simulate(chain, policy.thresholds, policy.target, xl)
    stop = cascade.stops(chain, policy.thresholds)
    interval = share_interval(np.choose(stop, [s.correct for s in chain]), xl.correct)
    share_accuracy = outcome["accuracy"] / float(xl.correct.mean())
    share_gflops = outcome["mean_gflops"] / xl.gflops
    timings = {"encode_ms": [encode_ms(retriever, timed_images, policy, b) for b in (1, batch)]}
    if replay is not None:
        timings["replay_ms"] = [replay_ms(replay, policy.stages, stop[:len(timed_images)], b,
                                          retriever.encoder.backend) for b in (1, batch)]
    replayed = f" replayed on {replay}'s shape (untrained)"
    return {"target": policy.target, "stages": policy.stages, "search": policy.plan and policy.plan.key,
            "thresholds": policy.thresholds,
            "calibration": {k: v for k, v in policy.calibration.items() if k not in ("command", "commit", "machine")},
            "test": {**outcome, "share_of_xl_accuracy": share_accuracy, "share_of_xl_accuracy_95": interval,
                     "share_of_xl_gflops": share_gflops},
            **timings,
            "targets": [
                {"what": "1-NN accuracy, share of XL's", "measured": round(share_accuracy, 4),
                 "target": f">= {policy.target}", "met": share_accuracy >= policy.target},
                {"what": "mean GFLOPs, share of XL's", "measured": round(share_gflops, 4),
                 "target": f"<= {COST_TARGET}", "met": share_gflops <= COST_TARGET},
                *({"what": f"mean encode time at batch {t['batch']}{where}, share of XL's",
                   "measured": t["share_of_xl"], "target": f"<= {COST_TARGET}", "met": t["share_of_xl"] <= COST_TARGET}
                  for key, where in (("encode_ms", ""), ("replay_ms", replayed)) for t in timings.get(key, []))]}


def _point(stage: cascade.Stage) -> dict:
    return {"spec": cascade.name(stage), "gflops": stage.gflops, "accuracy": float(stage.correct.mean())}


def _take(queries: tuple, rows) -> tuple:
    """The (images, class names, sources) of `cascade.labelled` at `rows`."""
    images, truth, sources = queries
    return images[rows], [truth[i] for i in rows], [sources[i] for i in rows]


def run(args: argparse.Namespace) -> dict:
    """Calibrate a cascade per target (the first is stored beside the index), evaluate each on the test split."""
    replay = None if args.replay == "none" else args.replay
    if replay:
        get_preset(replay)  # an unknown preset fails now, not after the measuring
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
    mixnmatch = cascade.measure(retriever, *test, [s.text for s in specs.monotone(retriever.encoder.model)],
                                args.signal, [None])
    report = {**provenance.record(), "dataset": args.dataset, "index": str(args.index),
              "checkpoint": str(args.checkpoint), "backends": {s: retriever.encoder.serving(s) for s in stages},
              "stages": stages, "signal": args.signal, "calibration_split": args.split,
              "calibration_queries": len(queries[0]),
              "test_queries": len(test[0]), "xl_accuracy": float(cascade.by_search(tested)[None][-1].correct.mean()),
              "fixed": [_point(s) for s in tested], "mixnmatch": [_point(s) for s in mixnmatch],
              "replay": replay,
              "cascades": [evaluate(retriever, p, tested, test[0][:args.timed], args.batch, None if i else replay)
                           for i, p in enumerate(policies)]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.json").write_text(json.dumps(report, indent=2))
    (args.out / "cascade.md").write_text(markdown(report))
    from .plots import cascade_png  # matplotlib: imported by the benchmark alone, not by every command's parser

    cascade_png(report, COST_TARGET, args.out / "cascade.png")
    return report


def markdown(r: dict) -> str:
    timed = r["cascades"][0]["encode_ms"]
    batch = timed[1]["batch"]
    if r["calibration_split"] == "test":
        calibrated_on, tested_on = "images of the test split (not in the gallery)", "other test queries"
    else:
        calibrated_on, tested_on = "gallery images (each left out of its own neighbours)", "test queries"
    replayed = (f" Replayed: the first cascade's stops on the same queries replayed on an untrained MatViT of "
                f"{r['replay']}'s shape and timed the same way against XL alone on it (a forward pass costs the "
                "same whatever its weights; which queries escalate is this model's)." if r["replay"] else "")
    lines = [f"# Query cascade: {r['dataset']}", "", f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}; "
             f"backends {', '.join(f'{s} {b}' for s, b in r['backends'].items())}", "",
             f"Candidate stages {', '.join(r['stages'])}. A cascade is a chain of them, cheapest first: a "
             f"query stops at the first stage whose {r['signal']} (for agreement: the share of its top "
             f"{cascade.VOTES} neighbours labelled like its top-1) reaches the stage's threshold, and pays for "
             f"every stage it ran (its encode and its search; `S@16-funnel`: S searching by the 16-d funnel). "
             f"Each cascade (chain and thresholds) is calibrated on "
             f"{r['calibration_queries']:,} {calibrated_on} for its target share of XL's 1-NN accuracy at the least "
             f"mean GFLOPs, then run on the {r['test_queries']:,} {tested_on} (95% interval of its share of XL's "
             f"1-NN over them). Encode time: mean per query over {timed[0]['queries']} test queries at batch 1 and "
             f"in batches of {batch}, cascade and XL alone interleaved, median of 3 passes.{replayed}", "",
             "| query encoder | thresholds | queries stopping at | mean GFLOPs | 1-NN | share of XL's 1-NN (95%) | "
             f"share of XL's GFLOPs | share of XL's encode time, batch 1 / {batch} |"
             + (f" replayed on {r['replay']}, batch 1 / {batch} |" if r["replay"] else ""),
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if r["replay"] else "")]
    xl = next(f for f in reversed(r["fixed"]) if "@" not in f["spec"])  # XL on the full vectors
    no_time = " |" + (" |" if r["replay"] else "")
    lines += [f"| {f['spec']} alone | | | {f['gflops']:.4f} | {f['accuracy']:.4f} | "
              f"{f['accuracy'] / xl['accuracy']:.4f} | {f['gflops'] / xl['gflops']:.3f} |{no_time}" for f in r["fixed"]]
    for c in r["cascades"]:
        t = c["test"]
        low, high = t["share_of_xl_accuracy_95"]
        times = [" / ".join(f"{e['share_of_xl']:.3f}" for e in c.get(key, []))
                 for key in ("encode_ms", "replay_ms")[:1 + bool(r["replay"])]]
        searched = f" (searching {c['search']})" if c.get("search") else ""
        lines.append(f"| **cascade for {c['target']:.1%}**: {' -> '.join(c['stages'])}{searched} | "
                     f"{', '.join(f'{x:.2f}' for x in c['thresholds'])} | "
                     f"{', '.join(f'{s} {v:.1%}' for s, v in t['stops'].items())} | {t['mean_gflops']:.4f} | "
                     f"{t['accuracy']:.4f} | {t['share_of_xl_accuracy']:.4f} ({low:.4f}-{high:.4f}) | "
                     f"{t['share_of_xl_gflops']:.3f} | {' | '.join(times)} |")
    first = r["cascades"][0]
    cheaper = [f for f in r["mixnmatch"] if f["gflops"] <= first["test"]["mean_gflops"]]
    best = max(cheaper, key=lambda f: f["accuracy"], default=None)
    if best:
        lines += ["", f"The most accurate of the {len(r['mixnmatch'])} fixed Mix'n'Match specs at no more GFLOPs than "
                      f"the first cascade: `{best['spec']}`, 1-NN {best['accuracy']:.4f} at {best['gflops']:.4f} "
                      f"GFLOPs (cascade: {first['test']['accuracy']:.4f})."]
    enough = [f for f in r["mixnmatch"] if f["accuracy"] >= first["target"] * r["xl_accuracy"]]
    cheapest = min(enough, key=lambda f: f["gflops"], default=None)
    if cheapest:
        lines += ["", f"The cheapest fixed spec with {first['target']:.1%} of XL's 1-NN: `{cheapest['spec']}`, "
                      f"{cheapest['gflops'] / xl['gflops']:.3f} of XL's GFLOPs "
                      f"(cascade: {first['test']['share_of_xl_gflops']:.3f})."]
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
    q.add_argument("--replay", default="matvit-s16",
                   help="also time the first cascade's stops on the timed queries replayed on an untrained model of "
                        "this preset's shape, against XL alone on it (`none`: do not)")
    q.add_argument("--backend", default="eager", help="the query encoders' backend (see `matvit search`)")
    q.add_argument("--out", type=Path, required=True, help="results directory")
    q.set_defaults(func=run)
