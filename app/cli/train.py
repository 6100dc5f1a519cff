"""`matvit train`, `matvit induce` and `matvit export`: a MatViT trained, induced from a plain ViT, or extracted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app import options
from matvit.config import AUGMENTATIONS, DISTILLATIONS, HEADS
from matvit.registry import PRESETS


def cmd_train(args: argparse.Namespace) -> None:
    from matvit import runtime, warmup
    from matvit.train import TrainOptions

    opts = TrainOptions(
        preset=args.preset, dataset=args.dataset, out=args.out, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, augment=args.augment, dense_epochs=args.dense_epochs,
        embed_dims=args.embed_dims, mode=args.mode, weights=args.weights,
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
                         batch_size=args.batch_size, lr=args.lr, embed_dims=args.embed_dims, seed=args.seed)
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
    print(json.dumps({"out": str(args.out), "submodel": spec.text, "widths": list(spec.widths),
                      "onnx": args.onnx}))


def embed_dims(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embed-dims", type=options.dims,
                        help="Matryoshka embedding dimensions, e.g. 16,32,64: every granularity also learns to "
                             "classify from each prefix of its embedding, so searches may use a prefix (the full "
                             "length is always trained; none: the full embedding only; default: the preset's)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train`, `induce` and `export` under `matvit`'s subcommands."""
    p = sub.add_parser("train", help="train a MatViT or a MatMamba (or a plain baseline) and evaluate every "
                                     "granularity")
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
    embed_dims(p)
    p.add_argument("--mode", choices=["sum", "sample"], default="sum",
                   help="sum: every granularity each step; sample: one drawn per step")
    p.add_argument("--weights", type=options.floats,
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
    options.runtime(p)
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
    embed_dims(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--seed", type=int, default=0)
    options.runtime(p)
    p.set_defaults(func=cmd_induce)

    p = sub.add_parser("export", help="extract a submodel as a standalone, smaller timm ViT")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--submodel", default="XL", help="e.g. XL, S or S,S,M,M,L,XL")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (images in, embeddings out)")
    p.set_defaults(func=cmd_export)
