"""The `matvit` command line. It parses options and calls the library; no model logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from matvit import provenance
from matvit.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto",
                        help="query encoder backend: auto (default) serves each submodel with the fastest of eager, "
                             "onnx and onnx-int8 whose embeddings match eager (cosine >= 0.999), measured with the "
                             "profile; or eager, compile, onnx, onnx-int8")


def _recall_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recall-target", type=float, default=0.95,
                        help="recall@10 an approximate index's nprobe / efSearch is tuned to")


INDEX_HELP = ("the index: a directory (FAISS), milvus:PATH.db (Milvus Lite, in this process) or "
              "milvus:http://HOST:19530 (a Milvus server); add #NAME for a collection other than matvit")
GALLERY_HELP = ("or a dataset's --split, read as training reads it: digits, fashion-mnist, folder:PATH (class "
                "sub-folders), csv:FILE (columns path,label[,split]) or wds:PATTERN (WebDataset shards)")
ON_DISK_HELP = ("IVF index keys only: build the inverted lists per chunk, merge them on disk with FAISS's on-disk "
                "merge and search them memory-mapped (for indexes larger than memory)")
INDEX_KEY_HELP = ("auto, Flat, HNSW32, IVF1024,PQ32, ... (FAISS factory); for Milvus: auto, AUTOINDEX, Flat, HNSW32, "
                  "IVF1024,Flat")


def _index_spec(text: str) -> str | Path:
    """`--index`: a directory path, or a `milvus:` URI kept as typed (a Path would fold its `//`)."""
    from retrieval.store import MILVUS_PREFIX

    return text if text.startswith(MILVUS_PREFIX) else Path(text)


def _index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", "--store", dest="index", type=_index_spec, required=True, help=INDEX_HELP)


def _gallery(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, help="a folder of images, all of them (class per sub-folder, or flat)")
    parser.add_argument("--dataset", help=GALLERY_HELP)
    parser.add_argument("--split", choices=["train", "test"], default="train", help="the --dataset split")
    parser.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")


def _wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for another writer of the index to finish (default: fail at once)")


def _device(parser: argparse.ArgumentParser) -> None:
    from matvit.runtime import DEVICES, PRECISIONS

    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else MPS, else CPU")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast precision of forwards and losses (fp16 adds a gradient scaler)")


def _runtime(parser: argparse.ArgumentParser) -> None:
    _device(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding streamed images")
    parser.add_argument("--in-memory", action="store_true",
                        help="decode a folder: dataset whole into memory once instead of streaming it each epoch")


def cmd_train(args: argparse.Namespace) -> None:
    from matvit import runtime, warmup
    from matvit.train import TrainOptions

    opts = TrainOptions(
        preset=args.preset, dataset=args.dataset, out=args.out, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, augment=args.augment, dense_epochs=args.dense_epochs,
        mode=args.mode, weights=args.weights,
        distill=args.distill, mixnmatch_prob=args.mixnmatch_prob, baseline=args.baseline, head=args.head,
        init=args.init and str(args.init), seed=args.seed,
    )
    with runtime.start(args.device, args.precision, args.compile) as rt:
        result = warmup.train(opts, rt, workers=args.workers, in_memory=args.in_memory, resume=args.resume)
    if result is None:  # not the main process of a torchrun group
        return
    print(f"{'granularity':<12}{'top-1':>8}{'1-NN':>8}")
    for g in result["top1"]:
        print(f"{g:<12}{result['top1'][g]:>8.4f}{result['knn1'][g]:>8.4f}")
    print(f"wrote {Path(args.out) / 'eval.json'}")


def cmd_induce(args: argparse.Namespace) -> None:
    from matvit import runtime
    from matvit.induce import InduceOptions, induce

    opts = InduceOptions(source=args.source, preset=args.preset, dataset=args.dataset, out=args.out,
                         data_dir=args.data_dir, importance=args.importance,
                         importance_batches=args.importance_batches, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    with runtime.start(args.device, args.precision, args.compile) as rt:
        result = induce(opts, rt, workers=args.workers, in_memory=args.in_memory, resume=args.resume)
    if result is None:  # not the main process of a torchrun group
        return
    shares = result["induce"]["mean_after"]
    print(f"{'granularity':<12}{'share':>8}{'top-1':>8}{'1-NN':>8}")
    for g in result["eval"]["top1"]:
        share = f"{shares[g]:>8.3f}" if g in shares else f"{1:>8.3f}"
        print(f"{g:<12}{share}{result['eval']['top1'][g]:>8.4f}{result['eval']['knn1'][g]:>8.4f}")
    print(f"share: mean fraction of each block's FFN importance ({result['induce']['scored_with']}) in the "
          f"granularity's neurons")
    print(f"wrote {Path(args.out) / 'induce.json'}, {Path(args.out) / 'eval.json'} and the MatViT checkpoint")


def cmd_export(args: argparse.Namespace) -> None:
    from matvit import checkpoint

    model, meta = checkpoint.load(args.checkpoint)
    spec = model.spec(args.submodel)
    model.export(spec, args.out, onnx=args.onnx, classes=meta.get("classes"), source_fingerprint=meta["fingerprint"])
    print(json.dumps({"out": str(args.out), "submodel": spec.text, "mlp_hidden_features": list(spec.widths),
                      "onnx": args.onnx}))


def _check_gallery(args: argparse.Namespace) -> None:
    if bool(args.images) == bool(args.dataset):
        raise UserError("give exactly one of --images PATH or --dataset NAME")


def _source(args, encoder):
    from retrieval import build

    size, channels = encoder.image_size, encoder.channels
    if args.images:
        return build.FolderSource(args.images, size, channels, workers=args.workers)
    return build.open_gallery(args.dataset, args.split, size, channels, args.data_dir, args.workers)


def _on_disk(args: argparse.Namespace) -> dict:
    """`on_disk=True` when asked for, else nothing (the stores' default)."""
    return {"on_disk": True} if args.on_disk else {}


def cmd_build_index(args: argparse.Namespace) -> None:
    from retrieval import build

    _check_gallery(args)
    with _embedding(args) as encoder:
        report = build.build(encoder, _source(args, encoder), args.out, args.submodel, args.index_key,
                             args.batch_size, args.resume, args.recall_target, args.wait, **_on_disk(args))
    if report:  # the main process (the others of a torchrun group return nothing)
        print(json.dumps(report, indent=2))


def cmd_index_add(args: argparse.Namespace) -> None:
    from retrieval import build

    _check_gallery(args)
    with _embedding(args) as encoder:
        report = build.add(encoder, _source(args, encoder), args.index, args.batch_size, args.resume,
                           args.recall_target, args.wait)
    if report:
        print(json.dumps(report, indent=2))


@contextlib.contextmanager
def _embedding(args: argparse.Namespace):
    """The checkpoint's encoder on `--device` / `--precision`, as one of torchrun's processes when started so."""
    from matvit import runtime
    from retrieval.encoder import Encoder

    with runtime.start(args.device, args.precision) as rt:
        yield Encoder.load(args.checkpoint, runtime=rt)


def cmd_index_remove(args: argparse.Namespace) -> None:
    from retrieval.store import remove

    print(json.dumps({"removed": remove(args.index, args.ids, args.wait)}))


def cmd_index_rebuild(args: argparse.Namespace) -> None:
    from retrieval.store import rebuild

    print(json.dumps(rebuild(args.index, args.index_key, args.recall_target, args.wait, **_on_disk(args)), indent=2))


def cmd_index_info(args: argparse.Namespace) -> None:
    from retrieval.jobs import unfinished
    from retrieval.store import open_store

    store = open_store(args.index)
    index = store.open()
    info = {**index.manifest, "version": index.version, "deleted_pending_rebuild": index.pending_deletions,
            "unfinished_build": unfinished(store.files, index.manifest), "advice": index.advice()}
    print(json.dumps(info, indent=2))


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
    start = time.perf_counter()  # build the submodels first, so that the timings below are the query's own
    for spec in (retriever.cascade().stages if args.cascade else [retriever.choose(args.submodel, _budget(args)).spec]):
        retriever.encoder.runner(spec)
    prepare_ms = (time.perf_counter() - start) * 1e3
    if args.cascade:
        result = retriever.search_cascade([args.image], k=args.k, search_params=params)[0]
    else:
        result = retriever.search([args.image], k=args.k, submodel=args.submodel, budget=_budget(args),
                                  search_params=params)[0]
    if args.json:
        print(json.dumps(result.to_dict() | {"prepare_ms": round(prepare_ms, 3)}, indent=2))
        return
    c = result.submodel
    print(f"submodel {c.spec} ({c.gflops:.4f} GFLOPs, {c.params:,} parameters): {c.reason}")
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
    print(f"stages {' -> '.join(policy.stages)}, thresholds {', '.join(f'{t:.3f}' for t in policy.thresholds)} "
          f"({policy.signal}); on {c['queries']} held-out queries: 1-NN {c['accuracy']:.4f} (XL alone "
          f"{c['xl_accuracy']:.4f}) at {c['share_of_xl_gflops']:.1%} of XL's GFLOPs; wrote {out}")


def cmd_profile(args: argparse.Namespace) -> None:
    from matvit import data
    from retrieval import budget
    from retrieval.encoder import Encoder
    from retrieval.store import open_store

    encoder = Encoder.load(args.checkpoint, backend=args.backend)
    accuracy = None
    store = open_store(args.index) if args.index else None
    if store:
        if not args.dataset:
            raise UserError("--index needs --dataset (a labelled query split) to measure accuracy")
        queries = data.load(args.dataset, args.split, encoder.image_size, encoder.channels, args.data_dir)
        accuracy = budget.index_accuracy(store.open(), encoder, queries)
    result = budget.profile(encoder, budget.candidates(encoder, args.submodels), accuracy)
    out = args.out or (store.files / budget.PROFILE_FILE if store else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        budget.save_profile(result, out)
    print(f"{'submodel':<22}{'params':>10}{'GFLOPs':>9}{'ms@1':>8}{'ms@32':>8}{'1-NN':>8}")
    for r in result["rows"]:
        print(f"{r['spec']:<22}{r['params']:>10,}{r['gflops']:>9.4f}{r['latency_ms_b1']:>8.2f}"
              f"{r['latency_ms_b32']:>8.2f}{r.get('knn1', float('nan')):>8.4f}")
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


def cmd_bench_consistency(args: argparse.Namespace) -> None:
    from app.bench.consistency import BenchOptions, run
    from matvit.config import GRANULARITY_NAMES

    unknown = [g for g in args.baselines if g not in GRANULARITY_NAMES]
    if unknown or "S" not in args.baselines:
        raise UserError(f"--baselines takes granularities of {', '.join(GRANULARITY_NAMES)}, S among them "
                        f"(got {','.join(args.baselines)})")
    for flag, result in (("--baselines-from", args.baselines_from), ("--matvit-from", args.matvit_from)):
        if result and not (result / "steps").is_dir():
            raise UserError(f"{flag} {result}: no consistency result there (no steps/ folder)")
    result = run(BenchOptions(dataset=args.dataset, preset=args.preset, out=args.out, epochs=args.epochs,
                              augment=args.augment, mixnmatch_prob=args.mixnmatch_prob, weights=args.weights,
                              dense_epochs=args.dense_epochs, baseline_epochs=args.baseline_epochs,
                              reuse=args.reuse, cache=args.cache, seeds=args.seeds, baselines_from=args.baselines_from,
                              matvit_from=args.matvit_from,
                              baselines=[g for g in GRANULARITY_NAMES if g in args.baselines], data_dir=args.data_dir))
    for t in result["targets"]:
        print(f"{'n/a   ' if t['met'] is None else 'met   ' if t['met'] else 'MISSED'} {t['target']}")
    print(f"wrote {args.out / 'consistency.json'}, consistency.md, grid.png, pareto.png")


def cmd_bench_index(args: argparse.Namespace) -> None:
    if args.speed:
        from app.bench.index_speed import markdown, run

        print(markdown(run(args.checkpoint, args.dataset, args.index, args.out, args.queries)))
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
        return
    from app.bench.index_scale import ScaleOptions
    from app.bench.index_scale import run as run_scale

    result = run_scale(ScaleOptions(
        out=args.out, checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
        sizes=tuple(args.sizes), kinds=tuple(args.kinds.split(",")), stores=tuple(args.stores.split(",")),
        cache=args.cache, recall_target=args.recall_target, latency_queries=args.latency_queries,
        batch_queries=args.batch_queries, seed=args.seed))
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}")
    print(f"wrote {args.out / 'index-scale.json'}, index-scale.md, index-scale.png ({len(result['rows'])} rows)")


def cmd_bench_induce(args: argparse.Namespace) -> None:
    from app.bench.induce import Bench, InduceBenchOptions

    opts = InduceBenchOptions(dataset=args.dataset, preset=args.preset, out=args.out, epochs=args.epochs,
                              dense_epochs=args.dense_epochs, importances=tuple(args.importances.split(",")),
                              scratch=args.scratch, cache=args.cache, seed=args.seed, data_dir=args.data_dir,
                              reference=args.reference)
    result = Bench(opts).run()
    print(f"wrote {args.out / 'induce.json'}, induce.md, induce.png ({len(result['steps'])} steps)")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import uvicorn

    from app.api import Settings, create_app

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    if args.metrics_need_key and api_key is None:
        raise UserError("--metrics-need-key needs an API key (--api-key-env)")
    settings = Settings(index=args.index, checkpoint=args.checkpoint, api_key=api_key,
                        metrics_need_key=args.metrics_need_key, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                        max_pixels=args.max_pixels, max_decode_bytes=args.max_decode_mb * 1024 * 1024,
                        decode_slots=args.decode_slots, max_batch=args.max_batch,
                        max_item_image_bytes=args.max_item_image_mb * 1024 * 1024, write_wait=args.write_wait,
                        backend=args.backend, inference_slots=args.inference_slots, batch_wait_ms=args.batch_wait_ms)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


def _supervise(command: list[str]) -> int:
    """Run `command` as a child and wait for it; SIGTERM and SIGINT to this process are passed on to the child
    and waited for, so stopping this process stops the child too. Returns the child's exit status."""
    import signal
    import subprocess

    child = subprocess.Popen(command)
    forward = {sig: signal.signal(sig, lambda signum, _: child.send_signal(signum))
               for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # this process is leaving on an error of its own
            child.kill()
            child.wait()


def cmd_demo(args: argparse.Namespace) -> None:
    from retrieval.store import open_store

    open_store(args.index).check_present()
    if not args.checkpoint.is_dir():
        raise UserError(f"checkpoint directory not found: {args.checkpoint}")
    demo = Path(__file__).with_name("demo.py")
    command = [sys.executable, "-m", "streamlit", "run", str(demo), "--server.headless", "true",
               "--server.address", args.host, "--server.port", str(args.port), "--browser.gatherUsageStats", "false",
               "--server.maxUploadSize", "10",  # MB, as the API's largest image file
               "--", "--index", str(args.index), "--checkpoint", str(args.checkpoint), "--results", str(args.results)]
    status = _supervise(command)
    if status > 0:
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    from matvit.config import AUGMENTATIONS, DISTILLATIONS, GRANULARITY_NAMES, HEADS
    from matvit.registry import PRESETS

    parser = argparse.ArgumentParser(prog="matvit", description="Adaptive image retrieval on MatViT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a MatViT (or a baseline ViT) and evaluate every granularity")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:PATH, csv:FILE or wds:PATTERN")
    p.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")
    p.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, logs, eval.json)")
    p.add_argument("--epochs", type=int, help="default: the preset's recipe")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--augment", choices=AUGMENTATIONS, help="training images: as they are, random crops, or crops "
                                                          "and flips (default: the preset's recipe)")
    p.add_argument("--dense-epochs", type=int,
                   help="a dense warm-up: train a plain ViT of the XL width this many epochs, order its FFN neurons "
                        "by weight, then train all granularities jointly from it (0: none; default: the preset's)")
    p.add_argument("--mode", choices=["sum", "sample"], default="sum",
                   help="sum: every granularity each step; sample: one drawn per step")
    p.add_argument("--weights", type=_floats,
                   help="per-granularity loss weights (sum) or probabilities (sample), smallest first")
    p.add_argument("--distill", choices=DISTILLATIONS, default="none",
                   help="self-distil the smaller granularities from XL: its logits (KL), its embedding (cosine), "
                        "its batch similarities (relational), or logits and embedding (both)")
    p.add_argument("--mixnmatch-prob", type=float, default=0.0,
                   help="probability per step of also training a random monotone Mix'n'Match submodel")
    p.add_argument("--baseline", choices=["S", "M", "L", "XL"],
                   help="train an independent plain ViT with this granularity's FFN width")
    p.add_argument("--head", choices=HEADS, help="the classifier: linear (default), or the scaled cosine of the "
                                                 "embedding to each class weight (the similarity retrieval ranks by)")
    p.add_argument("--init", type=Path, help="start from these weights (model.safetensors of the same preset)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--seed", type=int, default=0)
    _runtime(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("induce", help="make a MatViT of a plain timm ViT: reorder FFN neurons, then train jointly")
    p.add_argument("--from", dest="source", required=True,
                   help="a state dict (.safetensors, or .pth/.bin/.pt as timm writes them), a checkpoint directory, "
                        "or timm:NAME (timm's pretrained weights; needs the Hugging Face hub or its cache)")
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="the MatViT shape the checkpoint must have")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:PATH, csv:FILE or wds:PATTERN")
    p.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (induced.safetensors, induce.json, then the MatViT checkpoint)")
    p.add_argument("--importance", choices=["weight", "taylor", "none"], default="taylor",
                   help="neuron order: weight (fc1 row norm x fc2 column norm), taylor (|activation x gradient| "
                        "over a few batches), none (keep the order)")
    p.add_argument("--importance-batches", type=int, default=16,
                   help="training batches for the taylor score and a re-initialised head")
    p.add_argument("--epochs", type=int, default=2, help="joint fine-tuning epochs; 0: reorder only, then evaluate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="default: the preset's recipe")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--seed", type=int, default=0)
    _runtime(p)
    p.set_defaults(func=cmd_induce)

    p = sub.add_parser("export", help="extract a submodel as a standalone, smaller timm ViT")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--submodel", default="XL", help="e.g. XL, S or S,S,M,M,L,XL")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (images in, embeddings out)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-index", help="embed a gallery once (with XL) into an index: a FAISS index directory, "
                                           "or Milvus (--out milvus:./gallery.db, milvus:http://HOST:19530)")
    p.add_argument("--checkpoint", type=Path, required=True)
    _gallery(p)
    p.add_argument("--out", "--store", dest="out", type=_index_spec, required=True, help=INDEX_HELP)
    p.add_argument("--submodel", default="XL", help="the submodel that embeds the gallery")
    p.add_argument("--index-key", default="auto", help=INDEX_KEY_HELP)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--resume", action="store_true", help="finish an interrupted build without re-embedding")
    p.add_argument("--on-disk", action="store_true", help=ON_DISK_HELP)
    _recall_target(p)
    _wait(p)
    _device(p)
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("index", help="add, remove or re-index items, or show what an index holds")
    isub = p.add_subparsers(dest="index_command", required=True)
    q = isub.add_parser("add", help="embed more images into an existing index")
    _index(q)
    q.add_argument("--checkpoint", type=Path, required=True)
    _gallery(q)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--resume", action="store_true")
    _recall_target(q)
    _wait(q)
    _device(q)
    q.set_defaults(func=cmd_index_add)
    q = isub.add_parser("remove", help="delete items by id (ids are never reused)")
    _index(q)
    q.add_argument("--ids", type=_ints, required=True, help="comma-separated item ids")
    _wait(q)
    q.set_defaults(func=cmd_index_remove)
    q = isub.add_parser("rebuild", help="re-index the stored vectors with another index kind (no re-embedding)")
    _index(q)
    q.add_argument("--index-key", default="auto", help=INDEX_KEY_HELP)
    q.add_argument("--on-disk", action="store_true", help=ON_DISK_HELP)
    _recall_target(q)
    _wait(q)
    q.set_defaults(func=cmd_index_rebuild)
    q = isub.add_parser("info", help="print the manifest and counts")
    _index(q)
    q.set_defaults(func=cmd_index_info)

    p = sub.add_parser("search", help="find the nearest gallery images of a query image")
    _backend(p)
    _index(p)
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
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the value tuned at build)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the value tuned at build)")
    p.add_argument("--rerank", type=int, help="IVF with PQ/SQ codes: re-rank this many times k candidates by their "
                                              "stored vectors (default: the value tuned at build)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("cascade", help="calibrate the query cascade (the cheapest chain of submodels, escalating "
                                       "while unsure) for a share of XL's 1-NN accuracy; stored beside the index")
    _index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--dataset", required=True, help="labelled images; gallery images count as held-out queries "
                                                     "(each is left out of its own neighbours)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="when the model was trained on the gallery, calibrate on images it did not see (test): "
                        "its training images look easier than new queries")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--queries", type=int, default=2000, help="calibration queries drawn from the split")
    p.add_argument("--target", type=float, default=0.995, help="share of XL's 1-NN accuracy to keep")
    p.add_argument("--stages", default="S;M;L;XL", help="candidate submodels, cheapest first, separated by ';' (the "
                                                             "cascade is the cheapest chain of them)")
    p.add_argument("--signal", choices=["agreement", "margin"], default="agreement",
                   help="confidence: neighbours' label agreement, or the top-1 minus top-2 similarity")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_cascade)

    p = sub.add_parser("profile", help="measure latency, size and (with --index) accuracy of submodels")
    _backend(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--submodels", default="uniform",
                   help="families and specs separated by ';': uniform, monotone (width widening with depth), "
                        "narrowing (their mirrors), one-layer (one layer at another width), all, or a spec, "
                        "e.g. 'uniform;narrowing'")
    p.add_argument("--index", "--store", dest="index", type=_index_spec,
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

    p = sub.add_parser("serve", help="serve the REST API (OpenAPI docs at /docs)")
    _backend(p)
    _index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    p.add_argument("--metrics-need-key", action="store_true", help="put /metrics behind the API key too")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest image file in a request")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, from its header")
    p.add_argument("--max-decode-mb", type=int, default=128,
                   help="most memory decoding one image may hold (pixels x 1-4 bytes by mode, twice with alpha)")
    p.add_argument("--decode-slots", type=int, default=4,
                   help="images decoding at once (decoding holds at most slots x --max-decode-mb)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in a batch search or an item add")
    p.add_argument("--max-item-image-mb", type=int, default=32, help="largest gallery image file served back")
    p.add_argument("--inference-slots", type=int, default=2,
                   help="query batches encoding at once (torch gets cores / slots threads each)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a query batch waits for concurrent requests still decoding to join it")
    p.add_argument("--write-wait", type=float, default=30.0,
                   help="seconds an item add or delete waits for another writer of the index before 409")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the Streamlit demo (query, compare S with XL, benchmark plots)")
    _index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("docs/results"), help="where benchmark PNGs are")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("consistency", help="MatViT against four independently trained baselines")
    q.add_argument("--dataset", required=True, help="fashion-mnist, folder:PATH or digits")
    q.add_argument("--preset", required=True, choices=list(PRESETS))
    q.add_argument("--epochs", type=int, help="default: the preset's recipe")
    q.add_argument("--augment", choices=AUGMENTATIONS, help="default: the preset's recipe")
    q.add_argument("--mixnmatch-prob", type=float, default=0.0,
                   help="train the MatViT (not the baselines) with a random monotone Mix'n'Match spec in this share "
                        "of the steps, as `matvit train --mixnmatch-prob`")
    q.add_argument("--weights", type=_floats,
                   help="the MatViT's per-granularity loss weights, smallest first, as `matvit train --weights` "
                        "(the baselines train one width)")
    q.add_argument("--dense-epochs", type=int,
                   help="the MatViT's dense warm-up, as `matvit train --dense-epochs` (0: none; default: the preset's)")
    q.add_argument("--baseline-epochs", type=int,
                   help="epochs of each baseline (default: as many passes over the data as the MatViT makes, its "
                        "dense warm-up included; results before equal training used the MatViT's joint epochs)")
    q.add_argument("--out", type=Path, default=Path("runs/consistency"))
    q.add_argument("--reuse", action="store_true",
                   help="reuse finished trainings of the same setting in --cache and measured seeds in --out/steps")
    q.add_argument("--cache", type=Path, help="training runs (default runs/consistency/PRESET-DATASET, with "
                                               "-augment-KIND when --augment is given)")
    q.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds; the report gives mean and spread")
    q.add_argument("--baselines", type=lambda t: [g.strip().upper() for g in t.split(",")],
                   default=list(GRANULARITY_NAMES), help="baselines trained for every seed (S at least)")
    q.add_argument("--baselines-from", type=Path, metavar="RESULT",
                   help="a consistency result directory: take each seed's baseline measurements from its steps when "
                        "they trained with the same options, instead of training the baselines again")
    q.add_argument("--matvit-from", type=Path, metavar="RESULT",
                   help="a consistency result directory: take each seed's MatViT measurements from its steps when it "
                        "trained with the same options, instead of training the MatViT again")
    q.add_argument("--data-dir", type=Path)
    q.set_defaults(func=cmd_bench_consistency)
    q = bsub.add_parser("index", help="Flat, HNSW, IVF-PQ, IVF-SQ8 and auto over 100k and 1M real embeddings: recall, "
                                      "QPS, memory (--speed: build throughput and per-submodel query latency)")
    q.add_argument("--out", type=Path, required=True,
                   help="results directory (with --speed: a path without suffix; .json and .md are written)")
    q.add_argument("--checkpoint", type=Path, default=Path("runs/fmnist"), help="the MatViT that embeds")
    q.add_argument("--dataset", default="fashion-mnist", help="its train split grows the gallery, test the queries")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--sizes", type=_ints, default=[100_000, 1_000_000], help="gallery sizes")
    q.add_argument("--kinds", default="flat,hnsw,ivfpq,ivfsq8,auto",
                   help="index kinds: flat, hnsw, ivfpq, ivfsq8, auto")
    q.add_argument("--stores", default="faiss,milvus", help="stores measured: faiss, milvus")
    q.add_argument("--cache", type=Path, default=Path("runs/index-scale"), help="cached embeddings")
    _recall_target(q)
    q.add_argument("--latency-queries", type=int, default=200, help="batch-1 searches timed per query encoder")
    q.add_argument("--batch-queries", type=int, default=1024, help="queries searched in batches of 64")
    q.add_argument("--seed", type=int, default=0, help="seed of the gallery's augmentations")
    q.add_argument("--speed", action="store_true",
                   help="instead: build throughput and per-submodel query latency of one index of the train split")
    q.add_argument("--index", type=Path, default=Path("runs/bench-index"),
                   help="--speed: where the train split is indexed")
    q.add_argument("--queries", type=int, default=200, help="--speed: single-image queries timed per submodel")
    q.set_defaults(func=cmd_bench_index)
    q = bsub.add_parser("induce", help="MatViTs induced from a dense ViT against one trained from scratch")
    q.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder:PATH or digits")
    q.add_argument("--preset", default="matvit-small-fmnist", choices=list(PRESETS))
    q.add_argument("--epochs", type=int, default=2, help="joint epochs of the induced and from-scratch MatViTs")
    q.add_argument("--dense-epochs", type=int, default=5, help="training epochs of the dense XL-width ViT")
    q.add_argument("--importances", default="taylor,weight,none", help="importance scores to compare")
    q.add_argument("--no-scratch", dest="scratch", action="store_false",
                   help="skip the MatViT trained from scratch for the same joint epochs")
    q.add_argument("--out", type=Path, default=Path("docs/results/induce-fmnist"))
    q.add_argument("--cache", type=Path, help="training runs (default runs/induce/PRESET-DATASET)")
    q.add_argument("--reference", type=Path,
                   help="consistency.json whose baselines decide the targets (default: the committed one of the "
                        "same preset and dataset under docs/results)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-dir", type=Path)
    q.set_defaults(func=cmd_bench_induce)
    from app.bench.align import add_parser as add_align_parser
    from app.bench.backends import add_parser as add_backends_parser
    from app.bench.cascade import add_parser as add_cascade_parser
    from app.bench.layer_width import add_parser as add_layer_width_parser
    from app.bench.mixnmatch_order import add_parser as add_mixnmatch_order_parser
    from app.bench.speed import add_parser as add_speed_parser

    add_speed_parser(bsub)
    add_backends_parser(bsub)
    add_cascade_parser(bsub)
    add_align_parser(bsub)
    add_mixnmatch_order_parser(bsub)
    add_layer_width_parser(bsub)
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


if __name__ == "__main__":
    sys.exit(main())
