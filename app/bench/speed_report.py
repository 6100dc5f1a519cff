"""The speed benchmark's report (`speed`): its targets, what the ratios say, the Markdown and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from matvit.config import GRANULARITY_NAMES

# Targets of issue "Smaller must be faster".
NESTING_TARGET = 0.97  # throughput against a plain model of the same widths built directly
FLOP_TOLERANCE = {1: 0.25}  # latency ratio within this share of the FLOP ratio at batch 1 ...
BATCHED_TOLERANCE = 0.15  # ... and this at the batched size
INDEX_TARGET = 0.9  # build-index images/s against the pure XL forward
TRAIN_TARGET = 1.0  # joint epoch against the four baselines' epochs together


def _is_trained_small(model: dict) -> bool:
    return model["model"].startswith("checkpoint:")


def tolerance(batch: int) -> float:
    return FLOP_TOLERANCE.get(batch, BATCHED_TOLERANCE)


def nested_part(timing: dict) -> tuple[str, float]:
    """What a timing step's narrower widths shrink, and its share of XL's FLOPs (steps before MatMamba: the FFNs)."""
    if "nested_share_of_flops" not in timing:
        return "the FFNs", timing["ffn_share_of_flops"]
    what = {"mlp_hidden": "the FFNs", "d_inner": "the Mamba2 mixers' inner widths"}
    return what.get(timing["nested_width"]["field"], "the nested layers"), timing["nested_share_of_flops"]


def joint_epoch(epoch_s: dict) -> float:
    """The joint (nested) model's epoch in a training step (`MatViT` in steps before MatMamba)."""
    return epoch_s["joint"] if "joint" in epoch_s else epoch_s["MatViT"]


def targets(r: dict) -> list[dict]:
    out = []
    for m in r["models"]:
        timing, name = m["timing"], m["model"]
        for b in (timing or {}).get("batches", {}).values():
            cands = [(f"nested {row['spec']}", row["throughput_vs_plain"]["nested"]) for row in b["rows"]
                     if row["spec"] == "XL"]
            cands += [(f"extracted {row['spec']}", row["throughput_vs_plain"]["extracted"]) for row in b["rows"]]
            worst = min(cands, key=lambda c: c[1])
            out.append({"section": 1, "model": name, "batch": b["batch"],
                        "target": f"nested XL and every extracted submodel >= {NESTING_TARGET}x a plain "
                                  "model's throughput",
                        "measured": {k: v for k, v in cands}, "worst": {"which": worst[0], "ratio": worst[1]},
                        "met": worst[1] >= NESTING_TARGET})
        for b in (timing or {}).get("batches", {}).values():
            tol = tolerance(b["batch"])
            for kind in ("extracted", "nested"):
                devs = {row["spec"]: row["deviation"][kind] for row in b["rows"] if row["spec"] != "XL"}
                worst = max(devs, key=lambda k: abs(devs[k]))
                out.append({"section": 2, "model": name, "batch": b["batch"], "kind": kind,
                            "target": f"latency ratio within {tol:.0%} of the FLOP ratio ({kind})",
                            "deviation": devs, "worst": {"spec": worst, "deviation": devs[worst]},
                            "met": all(abs(v) <= tol for v in devs.values()),
                            "report_only": _is_trained_small(m)})
        if m["index"]:
            out.append({"section": 5, "model": name, "target": f"build-index >= {INDEX_TARGET}x the pure XL forward's "
                        "images/s", "ratio": m["index"]["ratio"], "met": m["index"]["ratio"] >= INDEX_TARGET})
    for t in r["training"]:
        out.append({"section": 5, "model": t["preset"], "target": f"joint training epoch <= {TRAIN_TARGET}x the four "
                    "baselines' epochs together", "ratio": t["ratio"], "met": t["ratio"] <= TRAIN_TARGET})
    return out


def findings(r: dict) -> list[str]:
    """What the ratios say: where the FLOP saving does not arrive, and why."""
    out = []
    for m in r["models"]:
        timing = m["timing"]
        if not timing:
            continue
        name, (part, share) = m["model"], nested_part(timing)
        for b in timing["batches"].values():
            s_row = next(row for row in b["rows"] if row["spec"] == "S")
            xl = b["rows"][-1]
            f = b["fit_extracted"]
            tol = tolerance(b["batch"])
            lat, fl = s_row["latency_ratio"]["extracted"], s_row["flop_ratio"]
            verdict = "within" if abs(lat / fl - 1) <= tol else "outside"
            out.append(
                f"- {name}, batch {b['batch']}: extracted S takes {lat:.2f}x XL's time for {fl:.2f}x its GFLOPs "
                f"({verdict} {tol:.0%}); {part} are {share:.0%} of XL's FLOPs at {timing['tokens']} tokens, so "
                f"no granularity can save more. Fit over the specs: {f['fixed_ms']:.2f} ms + {f['ms_per_gflop']:.2f} "
                f"ms/GFLOP, i.e. {f['fixed_share_of_xl']:.0%} of XL's {xl['ms']['extracted']:.2f} ms does not "
                "shrink with the FLOPs.")
        if _is_trained_small(m):
            devs = ", ".join(f"{row['deviation']['extracted']:+.0%} at batch {b['batch']}"
                             for b in timing["batches"].values() for row in b["rows"] if row["spec"] == "S")
            out.append(
                f"- {name} is a trained small model ({timing['tokens']} tokens of width "
                f"{timing['config']['embed_dim']}); its extracted S is off its FLOP ratio by {devs}. Its matmuls are "
                "so small that costs independent of the nested width (per-operator dispatch in every layer, layer "
                "norms, attention's softmax or the scan's elementwise work, reshapes, the patch embedding) are a large "
                "share of a forward, so the latency ratios cannot follow the FLOP ratios down.")
    limit = r["options"].get("max_load")
    for row in [x for m in r["models"] for x in (m["timing"], m["index"]) if x] + r["training"]:
        peak = max(v for v in (row.get("load_1min_at_start"), row.get("load_1min_at_end")) if v is not None)
        if limit is not None and peak > limit:
            what = row.get("model") or f"training {row.get('preset')}"
            out.append(f"- {what} ({row['settings']['kind']}): the 1-minute load reached {peak} during this step "
                       f"(limit {limit}): other jobs shared the cores, so its absolute times, and the ratios of its "
                       "shortest calls most, carry that noise.")
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    q = r["load_check"] or {}
    lines = [
        "# Speed: smaller must be faster",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['commit']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), Python {m['python']}, "
        f"torch {r['torch']}, {r['threads']} torch threads  ",
        f"Load: 1-minute load average {q.get('load_1min')} before the first measurement "
        f"(limit {q.get('max_load')}, waited {q.get('waited_s')} s"
        + (", **still over the limit**" if q.get("over_limit") else "") + "); per step below.",
        "",
        f"Method: {r['method']} Absolute milliseconds are recorded but are noisy on a shared CPU: read the ratios. "
        f"The retriever and build-index encode with the **{r['retriever_uses']}** standalone model "
        "(`extract`, cached per spec by `retrieval.encoder.Encoder`); the nested rows time the nested model "
        "itself given the spec (`model.embed(x, spec)`); plain is the model of the same widths built directly "
        "(timm's ViT, `MambaVision`).",
        "",
    ]
    for model in r["models"]:
        t = model["timing"]
        if not t:
            continue
        cfg, (part, share) = t["config"], nested_part(t)
        nested = t.get("nested_width", {"field": "mlp_hidden", "xl": cfg.get("mlp_hidden")})
        lines += [f"## {model['model']}", "",
                  f"{t.get('family', 'MatViT')}. Weights: {t['weights']} (fingerprint `{t['fingerprint']}`); "
                  f"{cfg['img_size']} px, patch {cfg['patch_size']} ({t['tokens']} tokens), width {cfg['embed_dim']}, "
                  f"depth {cfg['depth']}, {nested['field']} {nested['xl']}; {part} are {share:.0%} of XL's FLOPs. "
                  f"Load at start / end "
                  f"of the step: {t['load_1min_at_start']} / {t['load_1min_at_end']}; the step took "
                  f"{t['step_seconds']:.0f} s.", ""]
        for b in t["batches"].values():
            lines += [f"### Batch {b['batch']} ({b['repeats']} repeats)", "",
                      "| spec | GFLOPs | FLOP ratio | latency ratio extracted / nested | deviation extracted / nested "
                      "| throughput vs plain extracted / nested | ms extracted / nested / plain |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for row in b["rows"]:
                lr, dv, tp, ms = row["latency_ratio"], row["deviation"], row["throughput_vs_plain"], row["ms"]
                lines.append(f"| `{row['spec']}` | {row['gflops']:.3f} | {row['flop_ratio']:.3f} | "
                             f"{lr['extracted']:.3f} / {lr['nested']:.3f} | {dv['extracted']:+.1%} / "
                             f"{dv['nested']:+.1%} | {tp['extracted']:.3f} / {tp['nested']:.3f} | "
                             f"{ms['extracted']:.2f} / {ms['nested']:.2f} / {ms['plain']:.2f} |")
            f = b["fit_extracted"]
            lines += ["", f"Fit (extracted): ms = {f['fixed_ms']:.2f} + {f['ms_per_gflop']:.2f} x GFLOPs; the fixed "
                      f"part is {f['fixed_share_of_xl']:.0%} of XL's time.", ""]
        idx = model["index"]
        if idx:
            lines += [f"Indexing: `retrieval.build.build` over the first {idx['images']} images of {idx['dataset']} "
                      f"(test split, batch {idx['batch']}): {idx['build_images_per_s']:,.1f} images/s against "
                      f"{idx['forward_images_per_s']:,.1f} for the pure XL forward: **{idx['ratio']:.3f}x** "
                      f"(load {idx['load_1min_at_start']} / {idx['load_1min_at_end']}).", ""]
    if r["training"]:
        lines += ["## Training", "",
                  "| preset | dataset | images x batch | joint epoch s | S / M / L / XL baseline epoch s | "
                  "baselines together s | ratio |", "|---|---|---|---:|---:|---:|---:|"]
        for t in r["training"]:
            e = t["epoch_s"]
            lines.append(f"| {t['preset']} | {t['dataset']} | {t['images']} x {t['batch']} | {joint_epoch(e):.2f} | "
                         + " / ".join(f"{e[g]:.2f}" for g in GRANULARITY_NAMES if g in e)
                         + f" | {t['baselines_sum_s']:.2f} | **{t['ratio']:.3f}** |")
        lines += ["", f"The joint model trains in `{r['training'][0]['mode']}` mode: every granularity's forward and "
                  "backward on each batch, one optimizer step; a baseline does one forward and backward at its own "
                  "width. "
                  "Load at start / end: " + "; ".join(f"{t['preset']} {t['load_1min_at_start']} / "
                                                      f"{t['load_1min_at_end']}" for t in r["training"]) + ".", ""]
    if r["targets"]:
        lines += ["## Targets", "", "| section | model | batch | target | measured | result |",
                  "|---|---|---:|---|---|---|"]
        for t in r["targets"]:
            if t["section"] == 1:
                got = f"worst {t['worst']['which']} {t['worst']['ratio']:.3f}x"
            elif t["section"] == 2:
                got = f"worst `{t['worst']['spec']}` {t['worst']['deviation']:+.1%}"
            else:
                got = f"{t['ratio']:.3f}x"
            result = "met" if t["met"] else ("missed (reported)" if t.get("report_only") else "**missed**")
            lines.append(f"| {t['section']} | {t['model']} | {t.get('batch', '')} | {t['target']} | {got} | {result} |")
        lines.append("")
    if r["findings"]:
        lines += ["## Reading", "", *r["findings"], ""]
    if any(mm["timing"] for mm in r["models"]):
        lines += ["![latency ratio against FLOP ratio](speed.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Latency ratio against FLOP ratio per model (extracted filled, nested hollow), batch 1 and batched, with the
    tolerance bands."""
    from matplotlib.figure import Figure

    timed = [m for m in r["models"] if m["timing"]]
    batches = sorted({b["batch"] for m in timed for b in m["timing"]["batches"].values()})
    fig = Figure(figsize=(5.5 * len(batches), 4.6), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(batches)))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, batch in zip(axes, batches, strict=True):
        line = np.linspace(0, 1, 50)
        tol = tolerance(batch)
        ax.plot(line, line, color="grey", lw=1)
        ax.fill_between(line, line * (1 - tol), line * (1 + tol), color="grey", alpha=0.15,
                        label=f"within {tol:.0%} of the FLOP ratio")
        for color, m in zip(colors * 4, timed, strict=False):
            b = next((b for b in m["timing"]["batches"].values() if b["batch"] == batch), None)
            if b is None:
                continue
            x = [row["flop_ratio"] for row in b["rows"]]
            ax.scatter(x, [row["latency_ratio"]["extracted"] for row in b["rows"]], color=color, s=30,
                       label=f"{m['model']} extracted")
            ax.scatter(x, [row["latency_ratio"]["nested"] for row in b["rows"]], facecolors="none", edgecolors=color,
                       s=30, label=f"{m['model']} nested")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.3)
        ax.set_xlabel("GFLOPs(spec) / GFLOPs(XL)")
        ax.set_ylabel("latency(spec) / latency(XL)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)
