"""`matvit build-index` and `matvit index add / remove / rebuild / info`: a gallery embedded into an index, and
the index changed or shown."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from app import options
from matvit.errors import UserError


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
    from retrieval.store import info

    print(json.dumps(info(args.index), indent=2))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `build-index` and the `index` group under `matvit`'s subcommands."""
    p = sub.add_parser("build-index", help="embed a gallery once (with XL) into an index: a FAISS index directory, "
                                           "or Milvus (--out milvus:./gallery.db, milvus:http://HOST:19530)")
    p.add_argument("--checkpoint", type=Path, required=True)
    options.gallery(p)
    p.add_argument("--out", "--store", dest="out", type=options.index_spec, required=True, help=options.INDEX_HELP)
    p.add_argument("--submodel", default="XL", help="the submodel that embeds the gallery")
    p.add_argument("--index-key", default="auto", help=options.INDEX_KEY_HELP)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--resume", action="store_true", help="finish an interrupted build without re-embedding")
    p.add_argument("--on-disk", action="store_true", help=options.ON_DISK_HELP)
    options.recall_target(p)
    options.wait(p)
    options.device(p)
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("index", help="add, remove or re-index items, or show what an index holds")
    isub = p.add_subparsers(dest="index_command", required=True)
    q = isub.add_parser("add", help="embed more images into an existing index")
    options.index(q)
    q.add_argument("--checkpoint", type=Path, required=True)
    options.gallery(q)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--resume", action="store_true")
    options.recall_target(q)
    options.wait(q)
    options.device(q)
    q.set_defaults(func=cmd_index_add)
    q = isub.add_parser("remove", help="delete items by id (ids are never reused)")
    options.index(q)
    q.add_argument("--ids", type=options.ints, required=True, help="comma-separated item ids")
    options.wait(q)
    q.set_defaults(func=cmd_index_remove)
    q = isub.add_parser("rebuild", help="re-index the stored vectors with another index kind (no re-embedding)")
    options.index(q)
    q.add_argument("--index-key", default="auto", help=options.INDEX_KEY_HELP)
    q.add_argument("--on-disk", action="store_true", help=options.ON_DISK_HELP)
    options.recall_target(q)
    options.wait(q)
    q.set_defaults(func=cmd_index_rebuild)
    q = isub.add_parser("info", help="print the manifest and counts")
    options.index(q)
    q.set_defaults(func=cmd_index_info)
