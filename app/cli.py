"""The `matvit` command line. It parses options and calls the library; no model logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from matvit.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def cmd_train(args: argparse.Namespace) -> None:
    from matvit.train import TrainOptions, Trainer

    opts = TrainOptions(
        preset=args.preset, dataset=args.dataset, out=args.out, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, mode=args.mode, weights=args.weights, distill=args.distill,
        mixnmatch_prob=args.mixnmatch_prob, baseline=args.baseline, seed=args.seed,
    )
    result = Trainer(opts).run(resume=args.resume)
    print(f"{'granularity':<12}{'top-1':>8}{'1-NN':>8}")
    for g in result["top1"]:
        print(f"{g:<12}{result['top1'][g]:>8.4f}{result['knn1'][g]:>8.4f}")
    print(f"wrote {Path(args.out) / 'eval.json'}")


def cmd_export(args: argparse.Namespace) -> None:
    from matvit import checkpoint
    from matvit.extract import export

    model, meta = checkpoint.load(args.checkpoint)
    spec = model.spec(args.submodel)
    export(model, spec, args.out, onnx=args.onnx, classes=meta.get("classes"), source_fingerprint=meta["fingerprint"])
    print(json.dumps({"out": str(args.out), "submodel": spec.text, "mlp_hidden_features": list(spec.widths),
                      "onnx": args.onnx}))


def build_parser() -> argparse.ArgumentParser:
    from matvit.config import PRESETS

    parser = argparse.ArgumentParser(prog="matvit", description="Adaptive image retrieval on MatViT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a MatViT (or a baseline ViT) and evaluate every granularity")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist or folder:PATH")
    p.add_argument("--data-dir", type=Path, help="where the Fashion-MNIST IDX files are")
    p.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, logs, eval.json)")
    p.add_argument("--epochs", type=int, help="default: the preset's recipe")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--mode", choices=["sum", "sample"], default="sum",
                   help="sum: every granularity each step; sample: one drawn per step")
    p.add_argument("--weights", type=_floats,
                   help="per-granularity loss weights (sum) or probabilities (sample), smallest first")
    p.add_argument("--distill", choices=["none", "logits", "embedding", "both"], default="none",
                   help="self-distil the smaller granularities from XL")
    p.add_argument("--mixnmatch-prob", type=float, default=0.0,
                   help="probability per step of also training a random monotone Mix'n'Match submodel")
    p.add_argument("--baseline", choices=["S", "M", "L", "XL"],
                   help="train an independent plain ViT with this granularity's FFN width")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="extract a submodel as a standalone, smaller timm ViT")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--submodel", default="XL", help="e.g. XL, S or S,S,M,M,L,XL")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (images in, embeddings out)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"matvit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
