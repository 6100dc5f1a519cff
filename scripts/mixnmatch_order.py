"""Mix'n'Match specs that narrow with depth against their mirrors that widen: each against the segments joining
the trained granularities (`app.bench.consistency.mixnmatch_below`), from a `matvit profile --submodels narrowing`
run on a consistency step's MatViT and that step's own (widening) specs. Writes OUT/mixnmatch-order.json and .md.

    python scripts/mixnmatch_order.py --profile OUT/profile-narrowing.json --step STEP.json --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.bench.consistency import mixnmatch_below

MISS = -0.005  # more than 0.5 points under the segments


def against_segments(rows: list[dict], trained: dict[str, float]) -> dict[str, float]:
    """Each mixed spec's 1-NN minus the segments' at its GFLOPs."""
    return {k: v for k, v in mixnmatch_below(trained, rows).items() if "," in k}


def summary(below: dict[str, float]) -> dict:
    return {"misses": int(sum(v < MISS for v in below.values())), "worst_points": round(100 * min(below.values()), 2),
            "mean_points": round(100 * float(np.mean(list(below.values()))), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--step", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    profile, step = json.loads(args.profile.read_text()), json.loads(args.step.read_text())
    rows = profile["rows"]  # a uniform spec's text is its granularity's name
    narrowing = against_segments(rows, {r["spec"]: r["knn1"] for r in rows if "," not in r["spec"]})
    grid = step["matvit"]["grid"]
    widening = against_segments(step["mixnmatch"], {g: grid["XL"][g]["knn1"] for g in grid})
    mirror = {k: ",".join(reversed(k.split(","))) for k in widening}
    gain = np.array([narrowing[mirror[k]] - widening[k] for k in widening])
    result = {"profile": str(args.profile), "step": str(args.step), "profile_command": profile["command"],
              "commit": profile["commit"], "machine": profile["machine"],
              "widening": summary(widening), "narrowing": summary(narrowing),
              "mirror_pairs": {"count": len(gain), "narrowing_better": int((gain > 0).sum()),
                               "mean_gain_points": round(100 * gain.mean(), 2),
                               "min_points": round(100 * gain.min(), 2), "max_points": round(100 * gain.max(), 2)},
              "specs": {k: {"widening_vs_segments": round(100 * widening[k], 2), "mirror": mirror[k],
                            "mirror_vs_segments": round(100 * narrowing[mirror[k]], 2)}
                        for k in sorted(widening, key=widening.get)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixnmatch-order.json").write_text(json.dumps(result, indent=2))
    w, n, p, m = result["widening"], result["narrowing"], result["mirror_pairs"], profile["machine"]
    worst = next(iter(result["specs"].items()))
    dataset = step["settings"]["matvit"]["dataset"]
    md = [f"# Mix'n'Match specs that narrow with depth against specs that widen ({dataset}, seed {step['seed']})", "",
          f"Command: `python scripts/mixnmatch_order.py --profile {args.profile} --step {args.step} "
          f"--out {args.out}`  ",
          f"Profile: `{profile['command']}` at commit `{profile['commit'][:12]}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}",
          "", "The profile's `--index` holds the training split embedded with XL by `matvit build-index --dataset "
          "folder:data --split train --index-key Flat` (exact search) from the profile's checkpoint.", "",
          "The widening specs (width never decreasing with depth, the consistency benchmark's) are the step's; the "
          "narrowing ones (their mirrors, same parameters and GFLOPs) the profile's, measured on the same model "
          "against an exact XL index of the same gallery. Each is compared with the segments joining S, M, L and XL "
          "(1-NN against GFLOPs) of its own file.", "",
          f"| {p['count']} mixed specs | more than 0.5 points under the segments | worst | mean against the segments |",
          "|---|---:|---:|---:|",
          f"| widening | {w['misses']} | {w['worst_points']:+.2f} | {w['mean_points']:+.2f} |",
          f"| narrowing | {n['misses']} | {n['worst_points']:+.2f} | {n['mean_points']:+.2f} |", "",
          f"The narrowing spec beats its widening mirror in {p['narrowing_better']} of {p['count']} pairs, by "
          f"{p['mean_gain_points']:.2f} points on average (from {p['min_points']:+.2f} to {p['max_points']:+.2f}). The "
          f"worst widening spec, `{worst[0]}`, lies {-worst[1]['widening_vs_segments']:.2f} points under the segments; "
          f"its mirror `{worst[1]['mirror']}` {-worst[1]['mirror_vs_segments']:.2f}. Every pair is in "
          "`mixnmatch-order.json`."]
    (args.out / "mixnmatch-order.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
