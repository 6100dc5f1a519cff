"""Write a MatViT checkpoint of a preset's shape with random (seeded) weights, to time the query path at the
paper's sizes without training one.

    python scripts/random_checkpoint.py --preset matvit-s16 --out runs/s16-random

Its embeddings are meaningless for retrieval quality; every cost (encode, search, HTTP) is the real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from matvit import checkpoint
from matvit.model import MatViT
from matvit.registry import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="e.g. matvit-ti16, matvit-s16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = get_preset(args.preset).model
    model = MatViT(config)
    checkpoint.save(model, args.out, preset=args.preset, dataset=None, weights=f"random (seed {args.seed})",
                    classes=[str(i) for i in range(config.num_classes)])
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
