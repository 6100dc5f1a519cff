"""The main job end to end on the bundled default (scikit-learn's digits, `matvit-tiny-digits`):
train (or reuse) the model, index the gallery once with XL, query it with S and XL, print the 1-NN grid.

    python scripts/quickstart.py [--out runs/quickstart] [--retrain]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli import main as matvit


def run(*argv: str) -> None:
    print("\n$ matvit " + " ".join(argv), flush=True)
    if matvit(list(argv)) != 0:
        raise SystemExit(1)


def quickstart(out: Path, retrain: bool) -> None:
    model, index, grid = out / "model", out / "index", out / "grid.json"
    if retrain or not (model / "eval.json").is_file():
        run("train", "--preset", "matvit-tiny-digits", "--dataset", "digits", "--out", str(model))
    else:
        print(f"reusing the model in {model} (pass --retrain to train again)")
        print(json.dumps(json.loads((model / "eval.json").read_text())["knn1"]))
    run("build-index", "--checkpoint", str(model), "--dataset", "digits", "--split", "train", "--out", str(index))
    query = out / "query.png"
    _save_test_image(query)
    for spec in ("S", "XL"):
        run("search", "--index", str(index), "--checkpoint", str(model), "--image", str(query), "-k", "5",
            "--submodel", spec)
    run("eval-grid", "--index-checkpoint", str(model), "--dataset", "digits", "--out", str(grid))


def _save_test_image(path: Path) -> None:
    """The first test-split digit as a PNG, as a user's query would arrive."""
    from PIL import Image

    from matvit import data
    from matvit.images import to_hwc

    test = data.load("digits", "test", 8, 1)
    Image.fromarray(to_hwc(test.images[0])).resize((64, 64), Image.Resampling.NEAREST).save(path)
    print(f"\nquery: {path} (a test-split digit, true label {int(test.labels[0])})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    quickstart(args.out, args.retrain)
