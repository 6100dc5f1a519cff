"""Publish a training run's evaluation as docs/results/<name>.{json,md}.

    python scripts/publish_train.py runs/fmnist docs/results/train-fmnist

The JSON is the run's eval.json (top-1 and 1-NN per granularity, with the command, commit and
machine that produced it) plus the per-epoch log; the Markdown is a table of the same numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path, out: Path) -> None:
    result = json.loads((run / "eval.json").read_text())
    config = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    result.update({"preset": config["preset"], "dataset": config["dataset"], "epochs": len(log),
                   "fingerprint": config["fingerprint"], "train_log": log})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    baseline = config.get("baseline")
    what = f"plain ViT baseline at {baseline}'s FFN width" if baseline else "joint training of every granularity"
    lines = [f"# Training: {result['preset']} on {result['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}  ",
             f"Training wall time: {result['train_seconds'] / 60:.1f} min for {len(log)} epochs ({what}; "
             f"evaluation not included)", "",
             "| granularity | test top-1 | test 1-NN (train split as gallery, same submodel both sides) |",
             "|---|---:|---:|"]
    for g in result["top1"]:
        lines.append(f"| {g} | {result['top1'][g]:.4f} | {result['knn1'][g]:.4f} |")
    lines += ["", "Per epoch (training batches with the recipe's augmentation, label-smoothed loss):", "",
              "| epoch | minutes | " + " | ".join(f"{g} acc" for g in result["top1"]) + " |",
              "|---:|---:|" + "---:|" * len(result["top1"])]
    for e in log:
        lines.append(f"| {e['epoch']} | {e['seconds'] / 60:.1f} | " +
                     " | ".join(f"{e['acc'][g]:.4f}" for g in result["top1"]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
