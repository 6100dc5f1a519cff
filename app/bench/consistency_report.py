"""The consistency benchmark's report: the five targets, the Mix'n'Match misses against the segments, and the
Markdown of a result (`consistency.run` writes it beside the JSON)."""

from __future__ import annotations

import numpy as np

MIXNMATCH_MISS = -0.005  # target 5: a Mix'n'Match spec more than 0.5 points under the segments misses


def mixnmatch_below(trained: dict[str, float], mixnmatch: list[dict]) -> dict[str, float]:
    """How far each Mix'n'Match spec's 1-NN lies above (+) or below (-) the segments joining the trained
    granularities' points (GFLOPs, 1-NN); `trained` maps a granularity to its 1-NN on the XL index."""
    flops = {row["spec"]: row["gflops"] for row in mixnmatch}
    xs, ys = zip(*sorted((flops[g], acc) for g, acc in trained.items() if g in flops), strict=True)
    return {row["spec"]: row["knn1"] - float(np.interp(row["gflops"], xs, ys)) for row in mixnmatch}


def misses_by_mix(below: dict[str, float], smallest: str = "S", largest: str = "XL",
                  miss: float = MIXNMATCH_MISS) -> list[str]:
    """Markdown: where the Mix'n'Match specs more than `miss` under the segments cluster, counted by how many
    layers run at the smallest and how many at the largest granularity (misses / specs per cell)."""
    mixed = [spec.split(",") for spec in below if "," in spec]
    if not mixed:
        return []
    depth, cells = len(mixed[0]), {}
    for names in mixed:
        key = (names.count(smallest), names.count(largest))
        m, n = cells.get(key, (0, 0))
        cells[key] = (m + (below[",".join(names)] < miss), n + 1)
    both = [v for (a, b), v in cells.items() if a and b]
    rest = [v for (a, b), v in cells.items() if not (a and b)]
    total = lambda vs: (sum(m for m, _ in vs), sum(n for _, n in vs))  # noqa: E731
    return [f"Mix'n'Match misses (more than {-100 * miss:.1f} points under the segments) by the number of layers at "
            f"{smallest} (rows) and at {largest} (columns), misses / specs: specs with layers at both miss "
            "{} of {}, the others {} of {}.".format(*total(both), *total(rest)), "",
            f"| {smallest} \\ {largest} | " + " | ".join(str(b) for b in range(depth)) + " |",
            "|---|" + "---:|" * depth,
            *(f"| {a} | " + " | ".join(f"{cells[a, b][0]} / {cells[a, b][1]}" if (a, b) in cells else ""
                                       for b in range(depth)) + " |" for a in range(depth))]


def targets(r: dict) -> list[dict]:
    """The five claims, each with the numbers that decide it; `met` is None where the baselines it needs were
    not trained."""
    m, b = r["matvit"]["grid"], r["baseline"]["grid"]
    names, label = list(m), family(r)
    out = []
    gaps = {g: m[g][g]["knn1"] - b[g][g]["knn1"] for g in names if g in b}
    out.append({"target": f"1. each {label} diagonal cell within 1.0 point of its baseline",
                "met": all(v >= -0.01 for v in gaps.values()) if len(gaps) == len(names) else None,
                "matvit_minus_baseline": gaps})
    xl_s, base_s = m["XL"]["S"]["knn1"], b.get("S", {}).get("S", {}).get("knn1")
    out.append({"target": f"2. {label} index XL / query S >= baseline S on itself",
                "met": None if base_s is None else xl_s >= base_s, "matvit_xl_s": xl_s, "baseline_s_s": base_s})
    off = {f"{i}/{q}": m[i][q]["knn1"] - m[q][q]["knn1"] for i in names for q in names if i != q}
    out.append({"target": f"3. every {label} off-diagonal cell within 2 points of its query submodel's diagonal",
                "met": all(v >= -0.02 for v in off.values()), "worst": min(off.values()) if off else 0.0})
    chance = 1.0 / r["classes"]
    boff = {f"{i}/{q}": b[i][q]["knn1"] for i in b for q in b[i] if i != q}
    out.append({"target": "4. baseline off-diagonal cells within 10 points of chance",
                "met": all(abs(v - chance) <= 0.10 for v in boff.values()) if boff else None, "chance": chance,
                "max": max(boff.values()) if boff else None})
    below = mixnmatch_below({g: m["XL"][g]["knn1"] for g in names}, r["mixnmatch"])
    out.append({"target": "5. Mix'n'Match points on or above the segments joining trained granularities (0.5 pt)",
                "met": all(v >= MIXNMATCH_MISS for v in below.values()), "worst": min(below.values()),
                "below_by_more_than_0.5pt": sum(v < MIXNMATCH_MISS for v in below.values()), "points": len(below)})
    return out


def family(r: dict) -> str:
    """The nested model's family as reports name it (results before MatMamba: MatViT)."""
    return r.get("family", "MatViT")


def _cell(c: dict) -> str:
    return f"{100 * c['knn1']:.2f}" + (f" ± {100 * c['knn1_std']:.2f}" if c.get("n", 1) > 1 else "")


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**missed**"


def trained_on_lines(runs: list[dict], label: str) -> list[str]:
    """Which CPU ran which training, for the steps that recorded it (older steps did not)."""
    where: dict[str, list[str]] = {}
    for run in runs:
        recorded = run.get("trained_on") or {}
        trainings = [(label, recorded.get("matvit")),
                     *((f"baseline {g}", t) for g, t in recorded.get("baseline", {}).items())]
        for name, t in trainings:
            if t:
                where.setdefault(t["cpu"], []).append(f"seed {run['seed']} {name}")
    return ["Trained on: " + "; ".join(f"{cpu} ({', '.join(names)})" for cpu, names in where.items())
            + " (a seed reproduces a training on the same kind of CPU only)", ""] if where else []


def passes_sentence(r: dict) -> str:
    """How many passes over the data the nested model and its baselines made (results from before passes were
    recorded say nothing)."""
    if "passes" not in r:
        return ""
    mine, theirs, label = r["passes"]["matvit"], r["passes"]["baseline"], family(r)
    if set(theirs.values()) == {mine}:
        return (f" Every model makes the same {mine} passes over the data"
                + (f" (the {label}'s warm-up included)." if r.get("dense_epochs") else "."))
    return (f" **Unequal training**: the {label} makes {mine} passes over the data, the baselines "
            + ", ".join(f"{g} {n}" for g, n in theirs.items()) + ".")


def markdown(r: dict) -> str:
    m, b = r["matvit"]["grid"], r["baseline"]["grid"]
    names, runs, label = list(m), r["runs"], family(r)
    seeds = ", ".join(str(s) for s in r["seeds"])
    taken = [run for run in runs if run["baselines_from"]]
    reused = [run for run in runs if run.get("matvit_from")]
    spread = " ± the standard deviation over seeds" if len(runs) > 1 else ""
    warm_up = bool(r.get("dense_epochs"))
    epochs = f"{r['dense_epochs']} dense + {r['epochs']} joint epochs" if warm_up else f"{r['epochs']} epochs"
    lines = [f"# Cross-consistency: {r['dataset']}, {r['preset']}, {epochs}, seed(s) {seeds}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}` (each seed's own: `seeds` in the JSON)  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}", "",
             *trained_on_lines(runs, label),
             *(["Baselines measured before: " + "; ".join(
                 f"seed {run['seed']} in `{run['baselines_from']}` at commit "
                 f"`{run['baseline_commit'][:12]}`" for run in taken), ""] if taken else []),
             *([f"{label} measured before: " + "; ".join(
                 f"seed {run['seed']} in `{run['matvit_from']}` at commit "
                 f"`{run['matvit_commit'][:12]}`" for run in reused), ""] if reused else []),
             f"1-NN accuracy (%), mean over the seeds{spread}. Rows: index (gallery) encoder; columns: query "
             f"encoder. {label} submodels, with the independently trained baseline of the same width in brackets on "
             f"the diagonal. {label} of seed s trains with seed s; its baselines S, M, L, XL with seeds 4s+1 to 4s+4."
             + (f" The {label} starts its {r['epochs']} joint epochs from a dense ViT of XL's width trained for "
                f"{r['dense_epochs']} epochs." if warm_up else "")
             + passes_sentence(r)
             + (f" The {label} trains with a random monotone Mix'n'Match spec in {r['mixnmatch_prob']:.0%} of the "
                "steps." if r.get("mixnmatch_prob") else "")
             + (" Its loss weights (S to XL): " + ", ".join(f"{w:g}" for w in r["weights"]) + "."
                if r.get("weights") else "")
             + (f" Augmentation: {r['augment']}." if r.get("augment") else ""),
             "", "| index \\ query | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in names:
        cells = [_cell(m[i][q]) + (f" ({_cell(b[i][q])})" if i == q and i in b else "") for q in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "Baselines across models (index built by baseline i, queried by baseline j):", "",
              "| index \\ query | " + " | ".join(b) + " |", "|---|" + "---:|" * len(b)]
    for i in b:
        lines.append(f"| {i} | " + " | ".join(_cell(b[i][q]) if q in b[i] else "" for q in b) + " |")
    lines += ["", "## Targets (on the means)", ""]
    for t in r["targets"]:
        detail = ", ".join(f"{k}: {_fmt(v)}" for k, v in t.items() if k not in ("target", "met"))
        lines.append(f"- {_verdict(t['met'])}: {t['target']} ({detail})")
    if len(runs) > 1:
        lines += ["", "## Per seed", "", f"| seed | {label} XL / S | baseline S (its seed) | "
                  + " | ".join(f"target {k + 1}" for k in range(len(r["targets"]))) + " |",
                  "|---:|---:|---:|" + "---|" * len(r["targets"])]
        for run in runs:
            t2 = run["targets"][1]
            base = f"{100 * t2['baseline_s_s']:.2f} ({run['baseline_seeds']['S']})" if t2["baseline_s_s"] else ""
            lines.append(f"| {run['seed']} | {100 * t2['matvit_xl_s']:.2f} | {base} | "
                         + " | ".join(_verdict(t["met"]) for t in run["targets"]) + " |")
    below = mixnmatch_below({g: m["XL"][g]["knn1"] for g in names}, r["mixnmatch"])
    lines += ["", *misses_by_mix(below, names[0], names[-1])]
    cost, base = r["cost"]["matvit"], r["cost"]["baseline"]
    same = all(base[g] == {k: cost[g][k] for k in base[g]} for g in base if g in cost)
    lines += ["", "## Cost", "", f"{label}'s submodels, timed in the step of {r['cost_timed_in']}. "
              + (f"Each baseline has the shape (parameters and GFLOPs) of {label}'s submodel of its width, so it costs "
                 "the same." if same else "Baselines: " + ", ".join(
                     f"{g} {c['params']:,} params, {c['gflops']:.4f} GFLOPs" for g, c in base.items()) + "."),
              "", "| submodel | params | GFLOPs | ms (batch 1) | ms (batch 32) |", "|---|---:|---:|---:|---:|"]
    for g, c in cost.items():
        lines.append(f"| {g} | {c['params']:,} | {c['gflops']:.4f} | {c['latency_ms_b1']:.2f} | "
                     f"{c['latency_ms_b32']:.2f} |")
    ts = r["train_seconds"]
    lines += ["", f"Training wall time (mean per seed): {label} (all granularities jointly) "
              f"{ts['matvit'] / 60:.1f} min; the baselines {sum(ts['baseline'].values()) / 60:.1f} min together "
              f"({', '.join(f'{g} {s / 60:.1f}' for g, s in ts['baseline'].items())}). "
              f"Measuring (both grids, Mix'n'Match, costs) {r['measure_seconds'] / 60:.1f} min per seed.",
              "", f"Mix'n'Match: {len(r['mixnmatch'])} monotone specs queried against the {label} XL index "
              "(`pareto.png`).", "", "![grids](grid.png)", "", "![pareto](pareto.png)"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
