"""Write a dataset as WebDataset tar shards that `matvit train --dataset wds:DIR` streams.

    python scripts/make_shards.py --dataset folder:/data/photos --out /data/photos-shards
    python scripts/make_shards.py --dataset fashion-mnist --out /data/fmnist-shards --max-count 5000

Writes DIR/train-000000.tar ..., DIR/test-000000.tar ... (per sample KEY.jpg|png|... and KEY.cls, the layout
img2dataset writes) and DIR/dataset.json (class names and per-split counts). Folder and CSV image files are
copied as they are; the built-in datasets are encoded as PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matvit.errors import UserError
from matvit.shard_writer import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:PATH or csv:FILE")
    parser.add_argument("--out", type=Path, required=True, help="directory the shards and dataset.json go to")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' random order")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = parser.parse_args(argv)
    try:
        meta = write_shards(args.dataset, args.out, max_count=args.max_count, data_dir=args.data_dir,
                            seed=args.seed, overwrite=args.overwrite)
    except UserError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "counts": meta["counts"], "shards": meta["shards"],
                      "classes": len(meta["classes"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
