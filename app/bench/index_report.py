"""The scale benchmark's report (`index_scale`): its targets, what the numbers say, the Markdown and the plot."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from retrieval.faiss_store import TRAIN_SAMPLE

from .index_measure import (
    AUGMENTATION,
    HNSW_EF_CONSTRUCTION,
    MILVUS_BATCH_QUERIES,
    MILVUS_LATENCY_QUERIES,
    TIMING_BUDGET,
    TIMING_REPEATS,
)


def stores_status(stores: tuple[str, ...], rows: list[dict]) -> dict:
    """Whether each store was measured (at which sizes)."""
    out = {}
    for store in stores:
        sizes = sorted({row["size"] for row in rows if row.get("store", "faiss") == store})
        out[store] = {"measured": bool(sizes), "sizes": sizes}
        if not sizes:
            out[store]["reason"] = "not run yet"
    return out


# --- targets, Markdown, plot ---------------------------------------------------------------------------
def _row(r: dict, n: int, kind: str, store: str = "faiss") -> dict | None:
    return next((row for row in r["rows"] if row["size"] == n and row["kind"] == kind
                 and row.get("store", "faiss") == store), None)


def targets(r: dict) -> list[dict]:
    """At the largest size: `auto` at least 20x exact Flat's batch-1 QPS with recall@10 >= 0.95 (S and XL queries);
    IVF-PQ at most 1/8 of Flat's bytes per vector."""
    if not r["rows"]:
        return []
    n = max(row["size"] for row in r["rows"])
    flat, auto, ivfpq = _row(r, n, "flat"), _row(r, n, "auto"), _row(r, n, "ivfpq")
    out = []
    if flat and auto:
        speedup = {s: auto["queries"][s]["qps_batch_1"] / flat["queries"][s]["qps_batch_1"] for s in auto["queries"]}
        recall = {s: auto["queries"][s]["at_10"] for s in auto["queries"]}
        out.append({"target": f"at {n:,}, auto ({auto['index_key']}) answers a batch-1 query >= 20x faster than "
                              "exact Flat, with recall@10 >= 0.95",
                    "speedup": {s: round(v, 1) for s, v in speedup.items()},
                    "recall_at_10": {s: round(v, 4) for s, v in recall.items()},
                    "met": min(speedup.values()) >= 20 and min(recall.values()) >= 0.95})
    if flat and ivfpq:
        ratio = ivfpq["bytes_per_vector"] / flat["bytes_per_vector"]
        out.append({"target": f"at {n:,}, IVF-PQ ({ivfpq['index_key']}) needs <= 1/8 of Flat's bytes per vector",
                    "ratio": round(ratio, 4), "flat_to_ivfpq": round(1 / ratio, 1), "met": ratio <= 1 / 8})
    hnsw = _row(r, n, "hnsw")
    for row in (x for x in r["rows"] if x["size"] == n and x["index_key"].startswith("Prefix")
                and not x["kind"].endswith("-flat")):
        if flat and hnsw:
            out.append(_prefix_target(row, flat, hnsw, n))
    return out


def _prefix_target(row: dict, flat: dict, hnsw: dict, n: int) -> dict:
    """A prefix index with re-ranking against HNSW32 over the full vectors: recall@10 >= 0.95 and 1-NN within 0.2
    points of exact full search (S and XL queries), <= 1/3 of HNSW32's bytes per vector, >= 1.5x its batch-1 QPS."""
    queries = row["queries"]
    recall = {s: q["at_10"] for s, q in queries.items()}
    knn1 = {s: 100 * (q["knn1"] - flat["queries"][s]["knn1"]) for s, q in queries.items()}
    speedup = {s: q["qps_batch_1"] / hnsw["queries"][s]["qps_batch_1"] for s, q in queries.items()}
    ratio = row["bytes_per_vector"] / hnsw["bytes_per_vector"]
    return {"target": f"at {n:,}, the prefix index {row['index_key']} re-ranked by the full vectors: "
                      "recall@10 >= 0.95, 1-NN within 0.2 pt of exact full search, "
                      f"<= 1/3 of {hnsw['index_key']}'s bytes per vector and >= 1.5x its batch-1 QPS",
            "recall_at_10": {s: round(v, 4) for s, v in recall.items()},
            "knn1_minus_exact_pt": {s: round(v, 2) for s, v in knn1.items()},
            "bytes_ratio": round(ratio, 4), "speedup": {s: round(v, 2) for s, v in speedup.items()},
            "met": min(recall.values()) >= 0.95 and min(knn1.values()) >= -0.2 and ratio <= 1 / 3
            and min(speedup.values()) >= 1.5}


def _meets(row: dict, flat: dict) -> bool:
    """Whether `row` is at least 20x Flat's batch-1 QPS with recall@10 >= 0.95, for S and for XL queries."""
    return all(q["qps_batch_1"] >= 20 * flat["queries"][s]["qps_batch_1"] and q["at_10"] >= 0.95
               for s, q in row["queries"].items())


def findings(r: dict) -> list[str]:
    """What the numbers say, per size: unreachable recall targets and what tuning then chose, the accuracy cost,
    memory, and (where `auto` misses the speed and recall target) the measured kinds that meet it."""
    out = []
    for n in sorted({row["size"] for row in r["rows"]}):
        flat = _row(r, n, "flat")
        rows = [row for row in r["rows"] if row["size"] == n and not row.get("same_as") and row is not flat]
        for row in rows:
            store = "Milvus Lite " if row.get("store") == "milvus" else ""
            name = f"{n:,}, {store}`{row['index_key']}`"
            tuned = row.get("tuning_recall") or {}
            codes = [p for p in row["sweep"] if "rerank" not in p]  # the knob alone (no re-ranking)
            if codes and max(p["recall_at_10"] for p in codes) < r["recall_target"]:
                knob = next(k for k in codes[0] if k not in ("recall_at_10", "qps_batch_1"))
                best = max(p["recall_at_10"] for p in codes)
                enough = next(p for p in codes if p["recall_at_10"] >= best - 0.005)
                out.append(f"- {name}: without re-ranking, recall@10 never reaches {r['recall_target']} (XL queries: "
                           f"at most {best:.4f}); it is flat from {knob} {enough[knob]} on (within 0.005 of its best; "
                           f"{enough['qps_batch_1']:,.0f} QPS at batch 1 against {codes[-1]['qps_batch_1']:,.0f} at "
                           f"{codes[-1][knob]}): the codes, not the lists probed, limit recall.")
                rerank = row["search_params"].get("rerank", 1)
                if rerank > 1:
                    out.append(f"- {name}: tuning re-ranks {rerank} x 10 candidates per query by their stored vectors "
                               f"(read memory-mapped) at {knob} {row['search_params'][knob]}: recall@10 "
                               f"{_pair(row, 'at_10', '.4f')} (S / XL) at {_pair(row, 'qps_batch_1', ',.0f')} QPS at "
                               "batch 1; the stored vectors it reads are not in the bytes per vector.")
                elif tuned.get("met") is False:
                    out.append(f"- {name}: tuning keeps {_param(row)}, the most accurate setting it tried.")
            if row.get("train_seconds", 0) > 1:
                out.append(f"- {name}: building took {row['build_seconds']:,.0f} s, {row['train_seconds']:,.0f} s of "
                           f"them training on {row.get('train_vectors', min(n, TRAIN_SAMPLE)):,} vectors.")
            if flat:
                cost = max(flat["queries"][s]["knn1"] - q["knn1"] for s, q in row["queries"].items())
                mine, exact = (" / ".join(f"{q['knn1']:.4f}" for q in x["queries"].values()) for x in (row, flat))
                share = row["bytes_per_vector"] / flat["bytes_per_vector"]
                out.append(f"- {name}: 1-NN label accuracy {mine} (S / XL) against exact {exact}: "
                           f"{100 * cost:.2f} points lower at most; {share:.2f} of Flat's bytes per vector.")
    n = max((row["size"] for row in r["rows"]), default=0)
    flat, auto = _row(r, n, "flat"), _row(r, n, "auto")
    if flat and auto and not _meets(auto, flat):
        good = [row for row in r["rows"] if row["size"] == n and row.get("store", "faiss") == "faiss"
                and not row.get("same_as") and row["kind"] != "flat" and _meets(row, flat)]
        if good:
            best = min(good, key=lambda row: row["bytes_per_vector"])
            names = ", ".join(f"`{row['index_key']}`" for row in good)
            out.append(f"- At {n:,}, `auto` (`{auto['index_key']}`) misses the speed and recall target; of the "
                       f"measured kinds, {names} meet it. Recommended: `{best['index_key']}` "
                       f"({best['bytes_per_vector']:,.0f} bytes per vector, {_param(best)}).")
        else:
            out.append(f"- At {n:,}, `auto` (`{auto['index_key']}`) misses the speed and recall target, and no other "
                       "measured kind meets it.")
    return out


def _pair(row: dict, key: str, fmt: str) -> str:
    """S / XL values of one measure."""
    return f"{format(row['queries']['S'][key], fmt)} / {format(row['queries']['XL'][key], fmt)}"


def _param(row: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in row["search_params"].items()) or "-"


def markdown(r: dict) -> str:
    g = r["gallery"]
    m = r["machine"]
    lines = [
        f"# The index at scale: {r['dataset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['commit']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs while this ran), FAISS "
        f"{faiss.__version__}; batch-1 searches on 1 FAISS thread, batch {r['batch']} on "
        f"{faiss.omp_get_max_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}  ",
        f"Checkpoint: `{r['checkpoint']}` (fingerprint `{r['fingerprint']}`)",
        "",
        f"Gallery: XL embeddings of the {g['train_images']:,} training images, copy 0 as they are and "
        f"{g['copies'] - 1} seeded augmented copies ({AUGMENTATION}); a gallery of size n is the first n. "
        f"Queries: the {g['test_images']:,} test images embedded with S and with XL. Recall@1 / recall@10: "
        f"{r['recall_method']}; 1-NN: the share of test queries whose nearest gallery vector has their label. "
        f"efSearch / nprobe (and for PQ / SQ codes the exact re-ranking factor, reading the memory-mapped gallery) "
        f"tuned with `retrieval.tuning.tune` to recall@10 >= {r['recall_target']} on its own "
        f"probe queries; HNSW built with efConstruction {HNSW_EF_CONSTRUCTION} (FAISS's default, what "
        f"`build-index` builds). QPS at batch 1 over the first {r['options']['latency_queries']} queries, at batch "
        f"{r['batch']} over the first {r['options']['batch_queries']} (Milvus Lite: {MILVUS_LATENCY_QUERIES} and "
        f"{MILVUS_BATCH_QUERIES}), each the best of {TIMING_REPEATS} passes "
        f"(fewer once the passes took {TIMING_BUDGET:.0f} s); bytes per vector: the serialized index (IDMap2 "
        "included) over n, which leaves out the stored vectors re-ranking reads.",
        "",
    ]
    batched = f"qps_batch_{r['batch']}"
    for n in sorted({row["size"] for row in r["rows"]}):
        lines += [f"## {n:,} vectors", "",
                  "| kind | index | search | build s | bytes/vector | QPS b1 S / XL | QPS b64 S / XL | "
                  "recall@1 S / XL | recall@10 S / XL | 1-NN S / XL |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in (row for row in r["rows"] if row["size"] == n):
            kind = row["kind"] + (f" (= {row['same_as']})" if row.get("same_as") else "")
            kind = f"Milvus Lite {kind}" if row.get("store") == "milvus" else kind
            lines.append(f"| {kind} | `{row['index_key']}` | {_param(row)} | {row['build_seconds']:,.1f} | "
                         f"{row['bytes_per_vector']:,.1f} | {_pair(row, 'qps_batch_1', ',.0f')} | "
                         f"{_pair(row, batched, ',.0f')} | {_pair(row, 'at_1', '.4f')} | "
                         f"{_pair(row, 'at_10', '.4f')} | {_pair(row, 'knn1', '.4f')} |")
        lines.append("")
    if r["targets"]:
        lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
        for t in r["targets"]:
            if "speedup" in t:
                got = ("speed-up " + ", ".join(f"{s} {v:,.1f}x" for s, v in t["speedup"].items())
                       + "; recall@10 " + ", ".join(f"{s} {v:.4f}" for s, v in t["recall_at_10"].items()))
                if "bytes_ratio" in t:
                    got += ("; 1-NN " + ", ".join(f"{s} {v:+.2f} pt" for s, v in t["knn1_minus_exact_pt"].items())
                            + f"; {t['bytes_ratio']:.2f} of the bytes")
            else:
                got = f"1/{t['flat_to_ivfpq']} of Flat"
            lines.append(f"| {t['target']} | {got} | {'met' if t['met'] else '**missed**'} |")
        lines.append("")
    if r.get("findings"):
        lines += ["## Reading", "", *r["findings"], ""]
    lines += ["## Stores", ""]
    for store, status in r["stores"].items():
        said = (f"measured above at {', '.join(f'{n:,}' for n in status['sizes'])} vectors" if status["measured"]
                else f"not measured ({status['reason']})")
        lines.append(f"- {store}: {said}")
    lines.append("")
    return "\n".join(lines)


COLORS = {"flat": "black", "hnsw": "tab:blue", "ivfpq": "tab:orange", "ivfsq8": "tab:green"}


def plot(r: dict, path: Path) -> None:
    """Per size: recall@10 of XL queries against batch-1 QPS along each index's efSearch / nprobe (dashed: along
    rerank at the tuned nprobe), tuned points marked (S hollow, XL filled)."""
    from matplotlib.figure import Figure

    sizes = sorted({row["size"] for row in r["rows"]})
    fig = Figure(figsize=(6 * len(sizes), 4.6), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(sizes)))
    for ax, n in zip(axes, sizes, strict=True):
        for row in (row for row in r["rows"] if row["size"] == n and not row.get("same_as")):
            if row.get("store") == "milvus":
                q = row["queries"]
                ax.scatter(q["XL"]["qps_batch_1"], q["XL"]["at_10"], marker="D", color="tab:cyan", s=50, zorder=3,
                           label=f"Milvus Lite auto {row['index_key']} {_param(row)}")
                ax.scatter(q["S"]["qps_batch_1"], q["S"]["at_10"], marker="D", facecolors="none",
                           edgecolors="tab:cyan", s=50, zorder=3)
                continue
            color = COLORS.get(row["kind"], "tab:purple")
            for reranked, style in ((False, ".-"), (True, ".--")):
                line = [p for p in row["sweep"] if ("rerank" in p) == reranked]
                ax.plot([p["qps_batch_1"] for p in line], [p["recall_at_10"] for p in line], style, color=color, lw=1,
                        alpha=0.6)
            q = row["queries"]
            ax.scatter(q["XL"]["qps_batch_1"], q["XL"]["at_10"], color=color, s=60, zorder=3,
                       label=f"{row['kind']} {row['index_key']} {_param(row)}")
            ax.scatter(q["S"]["qps_batch_1"], q["S"]["at_10"], facecolors="none", edgecolors=color, s=60, zorder=3)
        auto = _row(r, n, "auto")
        if auto:
            ax.scatter(auto["queries"]["XL"]["qps_batch_1"], auto["queries"]["XL"]["at_10"], marker="*", s=220,
                       color="gold", edgecolors="black", zorder=4, label=f"auto = {auto['index_key']}")
        ax.axhline(r["recall_target"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("queries per second, batch 1 (log)")
        ax.set_ylabel("recall@10 against exact")
        ax.set_title(f"{n:,} vectors (filled: XL queries, hollow: S)")
        ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=120)
