"""MatMamba and MatViT side by side on the same data: 1-NN per granularity, training cost and per-query latency.

    python -m scripts.studies.backbones --vit-result docs/results/consistency-fmnist-warmup-15epochs \\
        --mamba-result docs/results/consistency-fmnist-matmamba --speed docs/results/speed-matmamba \\
        --out docs/results/backbones-fmnist

Nothing is measured here: the accuracy comes from the two consistency results (each backbone's grid and its
independently trained baselines), latency and training cost from one speed result that timed both presets on the
same machine in the same run (`matvit bench speed --preset A --preset B --train-preset A --train-preset B`): the
extracted submodels' milliseconds at batch 1 and the batched size, and the joint training epoch (all granularities
at once) over the same images. The consistency results' wall times are quoted with the CPU each ran on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matvit import provenance
from matvit.errors import UserError

from . import make_parser
from . import run as run_study

ROLES = ("vit", "mamba")


def _read(path: Path, name: str) -> dict:
    file = path / name
    if not file.is_file():
        raise UserError(f"no {name} in {path}")
    return json.loads(file.read_text())


def passes(result: dict) -> int:
    """Passes over the data of the nested model's recipe (warm-up included)."""
    return result.get("passes", {}).get("matvit") or result["epochs"] + (result.get("dense_epochs") or 0)


def side(result: dict, speed: dict) -> dict:
    """One backbone's column: its preset's accuracy and costs from its consistency result, its timings from the
    speed result."""
    preset = result["preset"]
    timing = next((m["timing"] for m in speed["models"] if m["model"] == preset and m["timing"]), None)
    training = next((t for t in speed["training"] if t["preset"] == preset), None)
    if timing is None or training is None:
        raise UserError(f"the speed result has no timing and training of {preset}: run it with --preset {preset} "
                        f"--train-preset {preset}")
    grid, base = result["matvit"]["grid"], result["baseline"]["grid"]
    ms = {b: {row["spec"]: row["ms"]["extracted"] for row in batch["rows"]} for b, batch in timing["batches"].items()}
    joint = training["epoch_s"].get("joint", training["epoch_s"].get("MatViT"))
    return {
        "preset": preset, "family": result.get("family", "MatViT"), "seeds": result["seeds"],
        "passes": passes(result),
        "granularities": {g: {"params": result["cost"]["matvit"][g]["params"],
                              "gflops": result["cost"]["matvit"][g]["gflops"],
                              "knn1_own_index": grid[g][g]["knn1"], "knn1_xl_index": grid["XL"][g]["knn1"],
                              "baseline_knn1": base.get(g, {}).get(g, {}).get("knn1"),
                              "ms": {b: ms[b][g] for b in ms}} for g in grid},
        "train": {"joint_epoch_s": joint, "images": training["images"],
                  "ms_per_image": 1e3 * joint / training["images"],
                  "recipe_wall_min": result["train_seconds"]["matvit"] / 60, "recipe_cpu": result["machine"]["cpu"]},
    }


def compare(vit: dict, mamba: dict, speed: dict) -> dict:
    names = [g for g in vit["granularities"] if g in mamba["granularities"]]
    return {"sides": {"vit": vit, "mamba": mamba}, "granularities": names,
            "speed_machine": speed["machine"], "speed_command": speed["command"],
            "train_cost_ratio": mamba["train"]["ms_per_image"] / vit["train"]["ms_per_image"],
            "recipe_cost_ratio": (mamba["train"]["ms_per_image"] * mamba["passes"])
            / (vit["train"]["ms_per_image"] * vit["passes"])}


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def markdown(r: dict) -> str:
    vit, mamba = r["sides"]["vit"], r["sides"]["mamba"]
    batches = list(vit["granularities"]["XL"]["ms"])
    head = " | ".join(f"{s['family']} {x}" for x in ("params", "GFLOPs") for s in (vit, mamba))
    lines = [f"# {mamba['family']} and {vit['family']} side by side: {mamba['preset']} and {vit['preset']}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Timings: `{r['speed_command']}` on {r['speed_machine']['cpu']}, {r['speed_machine']['cores']} cores", "",
             f"Accuracy: 1-NN (%) of the test split against the train split, means over seeds {vit['seeds']} "
             f"({vit['family']}) and {mamba['seeds']} ({mamba['family']}); own index: the granularity indexes and "
             "queries; XL index: XL indexes, the granularity queries (the product's use); baseline: a model of that "
             "width trained alone.", "",
             f"| granularity | {head} | " + " | ".join(
                 f"{s['family']} {x}" for x in ("own index", "XL index", "baseline") for s in (vit, mamba)) + " | "
             + " | ".join(f"{s['family']} ms b{b}" for b in batches for s in (vit, mamba)) + " |",
             "|---|" + "---:|" * (10 + 2 * len(batches))]
    for g in r["granularities"]:
        v, m = vit["granularities"][g], mamba["granularities"][g]
        cells = [f"{v['params']:,}", f"{m['params']:,}", f"{v['gflops']:.4f}", f"{m['gflops']:.4f}"]
        cells += [_pct(s[k]) for k in ("knn1_own_index", "knn1_xl_index", "baseline_knn1") for s in (v, m)]
        cells += [f"{s['ms'][b]:.2f}" for b in batches for s in (v, m)]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "## Training", "",
              "| backbone | joint epoch s (images) | ms per image | passes of the recipe | recipe wall time (CPU) |",
              "|---|---:|---:|---:|---|"]
    for s in (vit, mamba):
        t = s["train"]
        lines.append(f"| {s['family']} ({s['preset']}) | {t['joint_epoch_s']:.2f} ({t['images']:,}) | "
                     f"{t['ms_per_image']:.2f} | {s['passes']} | {t['recipe_wall_min']:.1f} min ({t['recipe_cpu']}) |")
    lines += ["", f"On the same machine, a joint training step of {mamba['family']} costs "
              f"{r['train_cost_ratio']:.2f}x {vit['family']}'s per image; with each recipe's passes, the whole "
              f"training costs {r['recipe_cost_ratio']:.2f}x. The recipes' wall times were measured on the CPUs "
              "named, with whatever else ran beside them: compare the timed epochs.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    speed = _read(args.speed, "speed.json")
    vit = side(_read(args.vit_result, "consistency.json"), speed)
    mamba = side(_read(args.mamba_result, "consistency.json"), speed)
    report = {**provenance.record(), "vit_result": str(args.vit_result), "mamba_result": str(args.mamba_result),
              "speed": str(args.speed), **compare(vit, mamba, speed)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbones.json").write_text(json.dumps(report, indent=2))
    (args.out / "backbones.md").write_text(markdown(report))
    print(f"wrote {args.out / 'backbones.json'}, backbones.md")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("scripts.studies.backbones",
                    "MatMamba and MatViT side by side: accuracy, training cost and latency")
    p.add_argument("--vit-result", type=Path, required=True, help="the MatViT's consistency result directory")
    p.add_argument("--mamba-result", type=Path, required=True, help="the MatMamba's consistency result directory")
    p.add_argument("--speed", type=Path, required=True,
                   help="a speed result that timed both presets and their training (speed.json)")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
