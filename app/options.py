"""Command-line options shared by `matvit`'s commands (app/cli/) and the benchmarks' parsers (app/bench/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def dims(text: str) -> list[int]:
    """`--embed-dims`: comma-separated prefix lengths, or `none` (an empty list: the full embedding only)."""
    return [] if text.strip().lower() == "none" else ints(text)


def backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto",
                        help="query encoder backend: auto (default) serves each submodel with the fastest of eager, "
                             "onnx and onnx-int8 whose embeddings match eager (cosine >= 0.999), measured with the "
                             "profile; or eager, compile, onnx, onnx-int8")


def recall_target(parser: argparse.ArgumentParser) -> None:
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


def index_spec(text: str) -> str | Path:
    """`--index`: a store's location as typed (`retrieval.store.location`)."""
    from retrieval.store import location

    return location(text)


def index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", "--store", dest="index", type=index_spec, required=True, help=INDEX_HELP)


def gallery(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, help="a folder of images, all of them (class per sub-folder, or flat)")
    parser.add_argument("--dataset", help=GALLERY_HELP)
    parser.add_argument("--split", choices=["train", "test"], default="train", help="the --dataset split")
    parser.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")


def wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for another writer of the index to finish (default: fail at once)")


def device(parser: argparse.ArgumentParser) -> None:
    from matvit.runtime import DEVICES, PRECISIONS

    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else MPS, else CPU")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast precision of forwards and losses (fp16 adds a gradient scaler)")


def runtime(parser: argparse.ArgumentParser) -> None:
    device(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding streamed images")
    parser.add_argument("--in-memory", action="store_true",
                        help="decode a folder: dataset whole into memory once instead of streaming it each epoch")
