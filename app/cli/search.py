"""`matvit search`, `matvit cascade`, `matvit profile` and `matvit eval-grid`: queries, the cascade's calibration,
and what each submodel costs and finds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from app import options
from matvit import provenance
from matvit.errors import UserError


def _budget(args):
    from retrieval.budget import Budget

    return Budget(ms=args.budget_ms, gflops=args.budget_gflops, params=args.budget_params)


def cmd_search(args: argparse.Namespace) -> None:
    from retrieval.retriever import Retriever

    retriever = Retriever(args.index, args.checkpoint, backend=args.backend)
    if args.budget_ms is not None:
        retriever.ensure_profile()
    params = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search), ("rerank", args.rerank))
              if v is not None}
    plan = retriever.search_plan(args.dims, args.funnel, args.k, args.shortlist)
    start = time.perf_counter()  # build the submodels first, so that the timings below are the query's own
    chosen = [] if args.cascade else [retriever.choose(args.submodel, _budget(args), args.k, plan is None).spec]
    for spec in retriever.cascade().stages if args.cascade else chosen:
        retriever.encoder.runner(spec)
    prepare_ms = (time.perf_counter() - start) * 1e3
    if args.cascade:
        result = retriever.search_cascade([args.image], k=args.k, search_params=params, plan=plan)[0]
    else:
        result = retriever.search([args.image], k=args.k, submodel=args.submodel, budget=_budget(args),
                                  search_params=params, plan=plan)[0]
    if args.json:
        print(json.dumps(result.to_dict() | {"prepare_ms": round(prepare_ms, 3)}, indent=2))
        return
    c = result.submodel
    print(f"submodel {c.spec} ({c.gflops:.4f} GFLOPs, {c.params:,} parameters): {c.reason}; "
          f"searched {result.search.text}")
    if result.cascade:
        print(f"cascade ran {', '.join(result.cascade['ran'])}: {result.cascade['gflops']:.4f} GFLOPs in all, "
              f"confidence {result.cascade['confidence']:.2f}")
    print(f"{'rank':>4} {'id':>8} {'score':>7}  {'label':<14} path")
    for hit in result.neighbours:
        print(f"{hit['rank']:>4} {hit['id']:>8} {hit['score']:>7.4f}  {str(hit['label']):<14} "
              f"{hit['metadata'].get('source', '')}")
    print("timings (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings_ms.items())
          + f"; prepare {prepare_ms:.0f} (building the submodels, once per process)")


def cmd_cascade(args: argparse.Namespace) -> None:
    from retrieval import cascade
    from retrieval.retriever import Retriever

    retriever = Retriever(args.index, args.checkpoint)
    queries = cascade.labelled(retriever, args.dataset, args.split, args.queries, args.data_dir, args.seed)
    stages = cascade.measure(retriever, *queries, args.stages.split(";"), args.signal)
    policy = cascade.calibrate(stages, args.target, args.signal, retriever.encoder.fingerprint)
    out = retriever.store.files / cascade.CASCADE_FILE
    policy.save(out)
    c = policy.calibration
    searched = f"searching {policy.plan.text}" if policy.plan else "searching the full vectors"
    print(f"stages {' -> '.join(policy.stages)}, thresholds {', '.join(f'{t:.3f}' for t in policy.thresholds)} "
          f"({policy.signal}), {searched}; on {c['queries']} held-out queries: 1-NN {c['accuracy']:.4f} (XL alone "
          f"{c['xl_accuracy']:.4f}) at {c['share_of_xl_gflops']:.1%} of XL's GFLOPs; wrote {out}")


def cmd_profile(args: argparse.Namespace) -> None:
    from matvit import data
    from retrieval import budget
    from retrieval.encoder import Encoder
    from retrieval.store import open_store

    encoder = Encoder.load(args.checkpoint, backend=args.backend)
    accuracy, plans = None, []
    store = open_store(args.index) if args.index else None
    if store:
        if not args.dataset:
            raise UserError("--index needs --dataset (a labelled query split) to measure accuracy")
        queries = data.load(args.dataset, args.split, encoder.image_size, encoder.channels, args.data_dir)
        gallery = store.open()
        accuracy = budget.index_accuracy(gallery, encoder, queries)
        length = gallery.manifest["dim"]
        if gallery.searches_prefixes and any(d < length for d in encoder.model.dims):
            plans = budget.searches(length, encoder.model.dims)
    result = budget.profile(encoder, budget.candidates(encoder, args.submodels), accuracy, plans=plans)
    if plans:
        result["searches"] = budget.time_searches(gallery, plans)
    out = args.out or (store.files / budget.PROFILE_FILE if store else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        budget.save_profile(result, out)
    print(f"{'submodel':<22}{'params':>10}{'GFLOPs':>9}{'ms@1':>8}{'ms@32':>8}{'1-NN':>8}")
    for r in result["rows"]:
        print(f"{r['spec']:<22}{r['params']:>10,}{r['gflops']:>9.4f}{r['latency_ms_b1']:>8.2f}"
              f"{r['latency_ms_b32']:>8.2f}{r.get('knn1', float('nan')):>8.4f}")
    if plans:
        print(f"{'search':<12}{'ms@1':>8}" + "".join(f"{r['spec'][:9]:>10}" for r in result["rows"]) + "  (1-NN)")
        for way in result["searches"]:
            print(f"{way['key']:<12}{way['search_ms_b1']:>8.3f}"
                  + "".join(f"{r['knn1_by_search'][way['key']]:>10.4f}" for r in result["rows"]))
    if out:
        print(f"wrote {out}")
    if args.report:
        write_budget_report(result, args.report)
        print(f"wrote {args.report.with_suffix('.md')}")


def write_budget_report(result: dict, path: Path) -> None:
    """PATH.json (the profile) and PATH.md: each submodel's cost and accuracy, and what a latency budget at each
    submodel's own batch-1 latency gets from the budget picker."""
    from retrieval import budget

    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    m = result["machine"]
    lines = ["# What a latency budget gets", "", f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {result['host']['torch_threads']} "
             f"threads; backend setting `{result['backend']}`", "",
             "| submodel | backend | params | GFLOPs | ms at batch 1 | ms at batch 32 | 1-NN |",
             "|---|---|---:|---:|---:|---:|---:|"]
    def knn1(row: dict) -> str:
        return f"{row['knn1']:.4f}" if "knn1" in row else "-"

    lines += [f"| `{r['spec']}` | {r['backend']} | {r['params']:,} | {r['gflops']:.4f} | {r['latency_ms_b1']:.3f} | "
              f"{r['latency_ms_b32']:.2f} | {knn1(r)} |" for r in rows]
    lines += ["", "| budget (ms at batch 1) | submodel chosen | its ms | its 1-NN | why |", "|---:|---|---:|---:|---|"]
    for limit in sorted({r["latency_ms_b1"] for r in rows}):
        row, why = budget.choose(rows, budget.Budget(ms=limit))
        lines.append(f"| {limit:.3f} | `{row['spec']}` | {row['latency_ms_b1']:.3f} | {knn1(row)} | {why} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def cmd_eval_grid(args: argparse.Namespace) -> None:
    from app.bench.plots import grid_png
    from matvit import data
    from retrieval.budget import candidates
    from retrieval.encoder import Encoder
    from retrieval.grid import grid

    encoder = Encoder.load(args.index_checkpoint)
    gallery = data.load(args.dataset, "train", encoder.image_size, encoder.channels, args.data_dir)
    queries = data.load(args.dataset, "test", encoder.image_size, encoder.channels, args.data_dir)
    result = grid(encoder, gallery, queries, candidates(encoder, args.index_submodels),
                  candidates(encoder, args.query_submodels))
    result.update({"dataset": args.dataset, "fingerprint": encoder.fingerprint, **provenance.record()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    png = grid_png(result, args.out.with_suffix(".png"))
    queries_specs = list(next(iter(result["grid"].values())))
    print("1-NN accuracy (rows: index submodel, columns: query submodel)")
    print(f"{'index / query':<16}" + "".join(f"{q:>10}" for q in queries_specs))
    for index_spec, row in result["grid"].items():
        print(f"{index_spec:<16}" + "".join(f"{row[q]['knn1']:>10.4f}" for q in queries_specs))
    print(f"wrote {args.out} and {png}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `search`, `cascade`, `profile` and `eval-grid` under `matvit`'s subcommands."""
    p = sub.add_parser("search", help="find the nearest gallery images of a query image")
    options.backend(p)
    options.index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-k", type=int, default=10)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--submodel", help="e.g. S or S,S,M,M,L,XL")
    group.add_argument("--budget-ms", type=float, help="latency budget at batch 1 on this machine")
    group.add_argument("--budget-gflops", type=float)
    group.add_argument("--budget-params", type=float)
    group.add_argument("--cascade", action="store_true",
                       help="encode with a small submodel first and escalate while unsure (calibrate with "
                            "`matvit cascade`)")
    dims = p.add_mutually_exclusive_group()
    dims.add_argument("--dims", type=int, help="search exactly on this prefix of the embedding (one of the Matryoshka "
                                               "dims the checkpoint was trained with; default: the full embedding)")
    dims.add_argument("--funnel", type=int, help="shortlist with this prefix, then re-rank the shortlist by the full "
                                                 "vectors")
    p.add_argument("--shortlist", type=int, help="the funnel's shortlist (default: the larger of 100 and 10 x k)")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the value tuned at build)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the value tuned at build)")
    p.add_argument("--rerank", type=int, help="IVF with PQ/SQ codes: re-rank this many times k candidates by their "
                                              "stored vectors (default: the value tuned at build)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("cascade", help="calibrate the query cascade (the cheapest chain of submodels, escalating "
                                       "while unsure) for a share of XL's 1-NN accuracy; stored beside the index")
    options.index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--dataset", required=True, help="labelled images; gallery images count as held-out queries "
                                                     "(each is left out of its own neighbours)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="when the model was trained on the gallery, calibrate on images it did not see (test): "
                        "its training images look easier than new queries")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--queries", type=int, default=2000, help="calibration queries drawn from the split")
    p.add_argument("--target", type=float, default=0.995, help="share of XL's 1-NN accuracy to keep")
    p.add_argument("--stages", default="S;M;L;XL",
                   help="candidate submodels, cheapest first, separated by ';' (the cascade is the cheapest chain of "
                        "them; a Matryoshka model's cascade also chooses how its stages search)")
    p.add_argument("--signal", choices=["agreement", "margin"], default="agreement",
                   help="confidence: neighbours' label agreement, or the top-1 minus top-2 similarity")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_cascade)

    p = sub.add_parser("profile", help="measure latency, size and (with --index) accuracy of submodels")
    options.backend(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--submodels", default="uniform",
                   help="families and specs separated by ';': uniform, monotone (width widening with depth), "
                        "narrowing (their mirrors), one-layer (one layer at another width), all, or a spec, "
                        "e.g. 'uniform;narrowing'")
    p.add_argument("--index", "--store", dest="index", type=options.index_spec,
                   help="measure 1-NN accuracy against this index (stored in its directory)")
    p.add_argument("--dataset", help="labelled queries for the accuracy, e.g. fashion-mnist")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--out", type=Path, help="profile JSON (default: profile.json in the index's directory)")
    p.add_argument("--report", type=Path, help="also write the profile as REPORT.json and a table of what each "
                                               "latency budget gets as REPORT.md (a path without suffix)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("eval-grid", help="1-NN / top-5 / mAP@10 / XL agreement for index x query submodels")
    p.add_argument("--index-checkpoint", type=Path, required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--index-submodels", default="S;M;L;XL", help="as `profile --submodels`")
    p.add_argument("--query-submodels", default="S;M;L;XL", help="as `profile --submodels`")
    p.add_argument("--out", type=Path, required=True, help="JSON file; the heatmap goes beside it as PNG")
    p.set_defaults(func=cmd_eval_grid)
