"""Latency against resolution: where MatMamba-Vision's Mamba2 scan (linear in the patches beyond one chunk) overtakes
MatViT's attention (quadratic), and how each grows with the number of patches.

    python -m scripts.studies.resolution --out docs/results/resolution

Two presets of similar size (default `matvit-ti16` and `matmamba-ti16`: width 192, patch 16, 5.7M and 6.0M
parameters with the classifier) with seeded random weights (timing only), rebuilt at each resolution (64, 128, 224
and 384 px: 16 to 576 patches). At each resolution and batch size (1 and 32) the extracted embedding paths
(`model.extract(spec)`, what the retriever runs) of S and XL of both models are timed interleaved
(`app.bench.speed.interleaved`) on a fixed number of torch threads under `torch.inference_mode`; a time is the
median of the timed calls, per call and per image. The report: a table per batch (milliseconds per image, MatMamba
over MatViT, S over XL against the FLOP ratio), the log-log slope of milliseconds per image against patches (1:
linear, 2: quadratic) and the crossover, the smallest measured resolution from which MatMamba is the faster at every
larger one. Each (resolution, batch) is a step written to `OUT/steps/` when it ends and reused by a rerun with the
same settings; `resolution.json`, `.md` and `.png` are rewritten after every step. The scan is quadratic inside a
chunk (`chunk_size`, 256 tokens in the presets) and linear from chunk to chunk: `--chunk-size` sets it for the
timed MatMamba.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from app.bench import steps
from app.bench.speed import interleaved, load_average, median_ms
from matvit import provenance, registry
from matvit.errors import UserError
from matvit.nested import NestedModel

from . import make_parser
from . import run as run_study

ROLES = ("vit", "mamba")  # the attention model and the scan model, in the order of the tables' columns
SPECS = ("S", "XL")
METHOD = ("Seeded random weights and inputs; torch.set_num_threads fixed (recorded). At each resolution and batch the "
          "four embedding paths (MatViT S and XL, MatMamba S and XL, each `model.extract(spec)`) are warmed up once, "
          "then timed in R rounds, interleaved (the order rotated every round; a call taking less than --min-seconds "
          "is repeated in a row, each call timed), under torch.inference_mode; a time is the median of a path's "
          "timed calls; per image = per call / batch. A ratio of two times is of medians from the same rounds.")


# --- models ------------------------------------------------------------------------------------------------------

def config_at(preset: str, size: int, chunk_size: int | None = None):
    """`preset`'s model config at `size` px (and, for a family with a scan, `chunk_size`), validated by the config's
    own round trip."""
    cfg = registry.get_preset(preset).model
    d = cfg.to_dict()
    if size % d["patch_size"]:
        raise UserError(f"--resolutions: {size} px is not a multiple of {preset}'s patch size {d['patch_size']}")
    d["img_size"] = size
    if chunk_size is not None and "chunk_size" in d:
        d["chunk_size"] = chunk_size
    try:
        return type(cfg).from_dict(d)
    except ValueError as e:
        raise UserError(f"{preset} at {size} px: {e}") from e


def build(preset: str, size: int, seed: int, chunk_size: int | None = None) -> NestedModel:
    cfg = config_at(preset, size, chunk_size)
    torch.manual_seed(seed)
    return registry.create(cfg).eval()


def patches(model: NestedModel) -> int:
    c = model.config
    return (c.img_size // c.patch_size) ** 2


# --- one step: a resolution at a batch size ---------------------------------------------------------------------

def settings_of(args: argparse.Namespace, size: int, batch: int) -> dict:
    return {"vit": args.vit, "mamba": args.mamba, "resolution": size, "batch": batch,
            "repeats": args.repeats if batch == 1 else args.repeats_batched, "threads": args.threads,
            "seed": args.seed, "min_seconds": args.min_seconds, "chunk_size": args.chunk_size}


def measure(args: argparse.Namespace, size: int, batch: int, log: Callable[[str], None] = print) -> dict:
    """The step of (`size`, `batch`): the four embedding paths timed interleaved, with each model's patches,
    parameters and GFLOPs per spec; reused when written before with the same settings."""
    settings = settings_of(args, size, batch)
    path = Path(args.out) / "steps" / f"r{size}-b{batch}.json"
    if (saved := steps.saved(path, settings, log)) is not None:
        return saved
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), load_average()
    models = {role: build(getattr(args, role), size, args.seed, args.chunk_size) for role in ROLES}
    x = torch.randn(batch, models["vit"].channels, size, size, generator=torch.Generator().manual_seed(args.seed))
    paths = {f"{role}:{spec}": models[role].extract(spec) for role in ROLES for spec in SPECS}
    calls = {name: (lambda e=e: e(x)) for name, e in paths.items()}
    log(f"[{path.stem}] {len(calls)} embedding paths x {settings['repeats']} repeats")
    with torch.inference_mode():
        times = interleaved(calls, settings["repeats"], warmup=1, min_seconds=args.min_seconds)
    row = {"settings": settings, "resolution": size, "batch": batch, "load_1min_at_start": load_start, "models": {}}
    for role, model in models.items():
        specs = {}
        for spec in SPECS:
            ms = median_ms(times[f"{role}:{spec}"])
            specs[spec] = {"params": model.num_params(spec), "gflops": round(model.forward_flops(spec) / 1e9, 5),
                           "ms": ms, "ms_per_image": round(ms / batch, 4), "calls_timed": len(times[f"{role}:{spec}"])}
        row["models"][role] = {"preset": getattr(args, role), "family": model.family, "patches": patches(model),
                               "tokens": patches(model) + 1, "patch_size": model.config.patch_size,
                               "chunk_size": getattr(model.config, "chunk_size", None), "specs": specs}
    row.update({"load_1min_at_end": load_average(), "step_seconds": round(time.perf_counter() - start, 1),
                "threads": args.threads, "torch": torch.__version__, **provenance.record()})
    return steps.write(path, row)


# --- analysis (pure) --------------------------------------------------------------------------------------------

def growth(patches: list[int], ms: list[float]) -> dict:
    """The log-log slope of `ms` against `patches` (1: linear, 2: quadratic) fitted over all points, and between
    each pair of neighbouring points; `slope` is None with fewer than two distinct patch counts."""
    pts = sorted(zip(patches, ms, strict=True))
    if len({p for p, _ in pts}) < 2:
        return {"slope": None, "intercept": None, "segments": []}
    lp, lm = np.log([p for p, _ in pts]), np.log([m for _, m in pts])
    slope, intercept = np.polyfit(lp, lm, 1)
    segments = [{"from": p0, "to": p1, "slope": round(float((np.log(m1) - np.log(m0)) / (np.log(p1) - np.log(p0))), 3)}
                for (p0, m0), (p1, m1) in zip(pts[:-1], pts[1:], strict=True) if p1 != p0]
    return {"slope": round(float(slope), 3), "intercept": round(float(intercept), 4), "segments": segments}


def crossover(resolutions: list[int], vit_ms: list[float], mamba_ms: list[float]) -> int | None:
    """The smallest resolution from which MatMamba is faster than MatViT at it and at every larger measured one
    (it has overtaken and stays ahead), or None when it is not faster at the largest."""
    found = None
    for r, v, m in sorted(zip(resolutions, vit_ms, mamba_ms, strict=True), reverse=True):
        if m >= v:
            break
        found = r
    return found


def projected_crossover(vit: dict, mamba: dict) -> float | None:
    """Where the two power-law fits (`growth` results) meet, in patches: ahead of the measured range an
    extrapolation only; None when they do not meet ahead (MatMamba grows as fast or faster)."""
    if vit["slope"] is None or mamba["slope"] is None or mamba["slope"] >= vit["slope"]:
        return None
    return round(float(np.exp((mamba["intercept"] - vit["intercept"]) / (vit["slope"] - mamba["slope"]))), 1)


# --- the report --------------------------------------------------------------------------------------------------

def cells(rows: list[dict]) -> list[dict]:
    """One flat record per (resolution, batch, model, spec)."""
    return [{"resolution": r["resolution"], "batch": r["batch"], "model": role, "preset": m["preset"],
             "patches": m["patches"], "spec": spec, **cell}
            for r in rows for role, m in r["models"].items() for spec, cell in m["specs"].items()]


def analyse(rows: list[dict]) -> dict:
    """Growth per model, spec and batch, and the crossover per spec and batch, over the measured steps."""
    table = cells(rows)
    out = {"growth": [], "crossover": []}
    patch = rows[0]["models"]["vit"]["patch_size"] if rows else 1
    for batch in sorted({c["batch"] for c in table}):
        fits = {}
        for role in ROLES:
            for spec in SPECS:
                sel = sorted((c for c in table if (c["batch"], c["model"], c["spec"]) == (batch, role, spec)),
                             key=lambda c: c["resolution"])
                fits[role, spec] = growth([c["patches"] for c in sel], [c["ms_per_image"] for c in sel])
                out["growth"].append({"batch": batch, "model": role, "preset": sel[0]["preset"], "spec": spec,
                                      "resolutions": [c["resolution"] for c in sel], **fits[role, spec]})
        for spec in SPECS:
            at = {(c["model"], c["resolution"]): c for c in table if (c["batch"], c["spec"]) == (batch, spec)}
            res = sorted(r for role, r in at if role == "vit" and ("mamba", r) in at)
            vit, mamba = ([at[role, r]["ms_per_image"] for r in res] for role in ROLES)
            out["crossover"].append({
                "batch": batch, "spec": spec, "resolution": crossover(res, vit, mamba),
                "mamba_faster_at": [r for r, v, m in zip(res, vit, mamba, strict=True) if m < v],
                "projected_patches": (proj := projected_crossover(fits["vit", spec], fits["mamba", spec])),
                "projected_px": None if proj is None else round(patch * proj ** 0.5),
                "largest_resolution": max(res, default=None)})
    return out


def report(args: argparse.Namespace, rows: list[dict], origin: dict) -> dict:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    return {**origin, "threads": args.threads, "torch": torch.__version__, "options": options, "method": METHOD,
            "cells": cells(rows), **analyse(rows), "steps": rows}


def _crossover_text(c: dict, r: dict) -> str:
    vit, mamba = r["options"]["vit"], r["options"]["mamba"]
    faster = ", ".join(f"{x} px" for x in c["mamba_faster_at"])
    if c["resolution"] is not None:
        text = f"{mamba} is faster than {vit} from {c['resolution']} px on"
        if c["mamba_faster_at"][0] < c["resolution"]:
            text += f" (and at {faster})"
        return text
    text = f"not within the measured range: {vit} is faster at {c['largest_resolution']} px"
    if faster:
        text += f" ({mamba} is faster at {faster} only)"
    if c["projected_patches"] is None:
        return text + f"; {mamba}'s time per image does not grow slower than {vit}'s, so their fits do not meet ahead"
    return text + (f"; extrapolating the fitted power laws, they would meet at about {c['projected_patches']:.0f} "
                   f"patches (about {c['projected_px']} px)")


def _row(res: int, cell: dict, load: float | None) -> str:
    """A batch table's row: `cell` holds the (role, spec) cells of resolution `res`."""
    pv, pm = cell["vit", "S"]["patches"], cell["mamba", "S"]["patches"]
    ms = {k: v["ms_per_image"] for k, v in cell.items()}
    split = [f"{ms[role, 'S'] / ms[role, 'XL']:.3f} ({cell[role, 'S']['gflops'] / cell[role, 'XL']['gflops']:.3f})"
             for role in ROLES]
    return (f"| {res} | {pv if pv == pm else f'{pv} / {pm}'} | "
            + " | ".join(f"{ms[role, spec]:.3f}" for role in ROLES for spec in SPECS)
            + " | " + " | ".join(f"{ms['mamba', spec] / ms['vit', spec]:.2f}" for spec in SPECS)
            + f" | {' | '.join(split)} | {load} |")


def markdown(r: dict) -> str:
    o = r["options"]
    vit, mamba = o["vit"], o["mamba"]
    m = r["machine"]
    lines = [f"# Latency against resolution: {vit} and {mamba}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {r['threads']} torch threads", "",
             r["method"], "", f"ViT: `{vit}`; Mamba: `{mamba}`.", ""]
    largest = max((c["resolution"] for c in r["cells"]), default=None)
    params = {(c["model"], c["spec"]): c["params"] for c in r["cells"] if c["resolution"] == largest}
    if params:
        lines += ["Parameters at the largest resolution (the position table grows with it): " + "; ".join(
            f"{o[role]} {spec} {params[role, spec] / 1e6:.2f}M" for role in ROLES for spec in SPECS), ""]
    for batch in sorted({c["batch"] for c in r["cells"]}):
        at = {(c["resolution"], c["model"], c["spec"]): c for c in r["cells"] if c["batch"] == batch}
        lines += [f"## Batch {batch}", "",
                  "Milliseconds per image; ratios of the medians; S / XL: time (FLOPs); load: the 1-minute load "
                  "average as the step began.", "",
                  "| px | patches | ViT S | ViT XL | Mamba S | Mamba XL | Mamba / ViT S | Mamba / ViT XL "
                  "| ViT S / XL | Mamba S / XL | load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for res in sorted({k[0] for k in at}):
            cell = {(role, spec): at.get((res, role, spec)) for role in ROLES for spec in SPECS}
            if any(v is None for v in cell.values()):
                continue
            step = next(s for s in r["steps"] if (s["resolution"], s["batch"]) == (res, batch))
            lines.append(_row(res, cell, step["load_1min_at_start"]))
        lines.append("")
    lines += ["## Growth", "",
              "Slope of log(ms per image) against log(patches), fitted over the measured resolutions (1: linear in "
              "the patches, 2: quadratic), and between neighbouring resolutions.", "",
              "| batch | model | spec | slope | between neighbours |", "|---:|---|---|---:|---|"]
    for g in r["growth"]:
        seg = ", ".join(f"{s['from']}-{s['to']}: {s['slope']:.2f}" for s in g["segments"])
        slope = "-" if g["slope"] is None else f"{g['slope']:.2f}"
        lines.append(f"| {g['batch']} | {g['preset']} | {g['spec']} | {slope} | {seg} |")
    lines += ["", "## Crossover", "",
              f"The smallest measured resolution from which {mamba} is faster per image than {vit} at it and at "
              "every larger one.", ""]
    lines += [f"- batch {c['batch']}, {c['spec']}: {_crossover_text(c, r)}." for c in r["crossover"]]
    chunk = {s["models"]["mamba"]["chunk_size"] for s in r["steps"]} - {None}
    if chunk:
        lines += ["", f"{mamba}'s scan runs in chunks of {', '.join(map(str, sorted(chunk)))} tokens: quadratic "
                      "inside a chunk, linear from chunk to chunk; a sequence of one chunk is all quadratic."]
    return "\n".join([*lines, "", "![latency per image against patches](resolution.png)"]) + "\n"


def plot(r: dict, path: Path) -> None:
    """Milliseconds per image against patches, log-log, one panel per batch, a line per model and spec."""
    batches = sorted({c["batch"] for c in r["cells"]})
    fig = Figure(figsize=(5.5 * len(batches), 4.2), layout="tight")
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    styles = {("vit", "S"): ("tab:blue", "--"), ("vit", "XL"): ("tab:blue", "-"),
              ("mamba", "S"): ("tab:orange", "--"), ("mamba", "XL"): ("tab:orange", "-")}
    for ax, batch in zip(axes, batches, strict=True):
        for (role, spec), (color, ls) in styles.items():
            sel = sorted((c for c in r["cells"] if (c["batch"], c["model"], c["spec"]) == (batch, role, spec)),
                         key=lambda c: c["patches"])
            ax.plot([c["patches"] for c in sel], [c["ms_per_image"] for c in sel], marker="o", color=color, ls=ls,
                    label=f"{r['options'][role]} {spec}")
        ticks = sorted({(c["patches"], c["resolution"]) for c in r["cells"]
                        if (c["batch"], c["model"]) == (batch, "vit")})
        if len(ticks) > 1:  # guides: time linear (slope 1) and quadratic (slope 2) in the patches from the first point
            first = min((c for c in r["cells"] if c["batch"] == batch), key=lambda c: (c["patches"], c["ms_per_image"]))
            p = np.array([ticks[0][0], ticks[-1][0]], dtype=float)
            for power, ls in ((1, ":"), (2, "-.")):
                ax.plot(p, first["ms_per_image"] * (p / p[0]) ** power, color="gray", lw=0.8, ls=ls,
                        label=f"slope {power}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([p for p, _ in ticks], [f"{p}\n{px} px" for p, px in ticks])
        ax.minorticks_off()
        ax.set_xlabel("patches")
        ax.set_ylabel("ms per image")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def write(args: argparse.Namespace, rows: list[dict], origin: dict) -> dict:
    out = Path(args.out)
    result = report(args, rows, origin)
    (out / "resolution.json").write_text(json.dumps(result, indent=2))
    (out / "resolution.md").write_text(markdown(result))
    if result["cells"]:
        plot(result, out / "resolution.png")
    return result


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Every (resolution, batch) step, then the report (rewritten after each step)."""
    for size in args.resolutions:  # every size fits both presets before anything is timed
        for role in ROLES:
            config_at(getattr(args, role), size, args.chunk_size)
    channels = {registry.get_preset(getattr(args, role)).model.in_chans for role in ROLES}
    if len(channels) > 1:
        raise UserError(f"--vit {args.vit} and --mamba {args.mamba} take images of different channels")
    (Path(args.out) / "steps").mkdir(parents=True, exist_ok=True)
    origin, rows, result = provenance.record(), [], {}
    for batch in args.batches:
        for size in args.resolutions:
            rows.append(measure(args, size, batch, log))
            result = write(args, rows, origin)
    return result


# --- command line -------------------------------------------------------------------------------------------------

def positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.resolution", "Latency per image against resolution: MatViT's attention "
                                                  "against MatMamba's scan, submodels S and XL.")
    q.add_argument("--out", type=Path, required=True, help="results directory (resolution.json/.md/.png, steps/)")
    q.add_argument("--vit", default="matvit-ti16", choices=list(registry.PRESETS), help="the attention model's preset")
    q.add_argument("--mamba", default="matmamba-ti16", choices=list(registry.PRESETS),
                   help="the scan model's preset")
    q.add_argument("--resolutions", type=positive_ints, default=[64, 128, 224, 384],
                   help="image sizes in px, multiples of both patch sizes (default 64,128,224,384)")
    q.add_argument("--batches", type=positive_ints, default=[1, 32], help="batch sizes (default 1,32)")
    q.add_argument("--repeats", type=int, default=5, help="interleaved rounds at batch 1")
    q.add_argument("--repeats-batched", type=int, default=3, help="interleaved rounds at larger batches")
    q.add_argument("--min-seconds", type=float, default=0.2,
                   help="a path faster than this is called several times in a row per round (each call timed)")
    q.add_argument("--chunk-size", type=int, help="the scan's chunk length for the MatMamba (default: its preset's)")
    q.add_argument("--threads", type=int, default=2, help="torch threads, fixed for the whole run")
    q.add_argument("--seed", type=int, default=0)
    return q


def _main(args: argparse.Namespace) -> None:
    for name in ("repeats", "repeats_batched", "threads", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_seconds < 0:
        raise UserError("--min-seconds cannot be negative")
    r = run(args)
    for c in r["crossover"]:
        print(f"batch {c['batch']}, {c['spec']}: {_crossover_text(c, r)}")
    print(f"wrote {args.out / 'resolution.json'}, resolution.md, resolution.png")


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
