"""The input-adaptive query cascade: encode a query with the smallest submodel first and escalate to the next
larger one only while its result looks uncertain, always searching the one XL index.

A stage's confidence in a query is the agreement of its neighbours: the share of its top `VOTES` that carry
its top-1's label (on a gallery without labels: the margin between the top-1 and top-2 similarity). A policy
holds its stages (cheapest first) and a threshold per stage but the last; a query stops at the first stage whose
confidence reaches it. `calibrate` chooses, among every chain of the measured stages (S -> XL skips M and L;
one submodel alone is a chain too) and a grid of thresholds, the policy that keeps a stated share of XL's 1-NN
accuracy on held-out queries at the least mean GFLOPs. A stage's GFLOPs are its submodel's encode and its search
at the index's size. For a Matryoshka model the way of searching is a knob too: every stage of a policy searches
one way (the full vectors, a trained prefix, or its funnel), and calibration tries each, always against XL on the
full vectors. It is stored beside the index (`cascade.json`), like the profile.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from matvit import data, provenance
from matvit.errors import UserError

from .budget import search_gflops
from .prefix import Plan

CASCADE_FILE = "cascade.json"
VOTES = 10  # neighbours whose labels vote on a stage's confidence
GRID = 21  # candidate thresholds per stage: quantiles of its confidence on the calibration queries
Z = 1.645  # a policy keeps its target at the one-sided 95% lower bound over the calibration queries, not just on them
SIGNALS = ("agreement", "margin")


class CascadeError(UserError):
    """No calibrated cascade for this model, or one that cannot meet its target."""


@dataclass
class Stage:
    """One stage's results on the calibration queries: whether its top-1 label is right, and its confidence;
    `gflops` are its encode's and its search's (by `search`, None: the full vectors)."""

    spec: str
    gflops: float
    correct: np.ndarray
    confidence: np.ndarray
    search: Plan | None = None


@dataclass
class Policy:
    """Stages (cheapest first, the last is final), the confidence each but the last needs to stop, and how the
    policy was calibrated."""

    stages: list[str]
    thresholds: list[float]
    signal: str
    fingerprint: str
    target: float  # the share of XL's 1-NN accuracy aimed for
    calibration: dict = field(default_factory=dict)
    search: dict | None = None  # how every stage searches (`Plan`'s fields; None: the full vectors)

    @property
    def plan(self) -> Plan | None:
        return None if self.search is None else Plan(self.search["dims"], self.search["shortlist"])

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> Policy:
        try:
            policy = cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise CascadeError(f"no calibrated cascade at {path}; calibrate one with `matvit cascade`") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise CascadeError(f"{path} is not a cascade policy ({e}); calibrate again with `matvit cascade`") from e
        if policy.fingerprint != fingerprint:
            raise CascadeError(f"the cascade in {path} was calibrated for model {policy.fingerprint}, not "
                               f"{fingerprint}; calibrate again with `matvit cascade`")
        return policy


def confidence(signal: str, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per query: the share of its neighbours (columns, best first) labelled like its top-1 (`agreement`;
    a missing label, -1, never agrees), or its top-1 minus top-2 similarity (`margin`)."""
    if signal == "margin":
        return scores[:, 0] - scores[:, 1] if scores.shape[1] > 1 else np.ones(len(scores))
    return ((labels == labels[:, :1]) & (labels >= 0)).mean(axis=1)


def stops(stages: list[Stage], thresholds: list[float]) -> np.ndarray:
    """Per query, the index of the stage it stops at: the first whose confidence reaches its threshold."""
    stop = np.full(len(stages[0].correct), len(stages) - 1)
    open_ = np.ones(len(stop), dtype=bool)
    for i, (stage, threshold) in enumerate(zip(stages[:-1], thresholds, strict=True)):
        here = open_ & (stage.confidence >= threshold)
        stop[here] = i
        open_ &= ~here
    return stop


def simulate(stages: list[Stage], thresholds: list[float], target: float = 1.0, xl: Stage | None = None) -> dict:
    """Accuracy, mean GFLOPs and the share of queries stopping at each stage of a policy on the calibration
    queries (a query escalated from S to M has paid for both), and `surplus`: the lower bound (`Z` standard
    errors) of its accuracy minus `target` times XL's (default: the last stage), per query; at least 0 meets
    the target."""
    n = len(stages[0].correct)
    stop = stops(stages, thresholds)
    paid = np.cumsum([s.gflops for s in stages])
    correct = np.choose(stop, [s.correct for s in stages])
    gain = correct - target * (xl or stages[-1]).correct
    return {"accuracy": float(correct.mean()), "mean_gflops": float(paid[stop].mean()),
            "stops": {s.spec: float(np.mean(stop == i)) for i, s in enumerate(stages)},
            "surplus": float(gain.mean() - Z * gain.std() / np.sqrt(n))}


def chains(stages: list[Stage]) -> list[list[Stage]]:
    """Every non-empty subsequence of the stages, in their order: the cascades one measurement can calibrate."""
    return [[stages[i] for i in range(len(stages)) if mask >> i & 1] for mask in range(1, 2 ** len(stages))]


def by_search(stages: list[Stage]) -> dict[Plan | None, list[Stage]]:
    """The stages grouped by their way of searching (the full vectors, None, first), each group in spec order."""
    groups: dict[Plan | None, list[Stage]] = {None: []}
    for stage in stages:
        groups.setdefault(stage.search, []).append(stage)
    return groups


def calibrate(stages: list[Stage], target: float, signal: str, fingerprint: str) -> Policy:
    """The chain of stages and thresholds with the least mean GFLOPs whose accuracy is at least `target` times
    XL's on the full vectors (the last stage searching them) with `Z` standard errors to spare over the
    calibration queries (thousands of candidates are tried: one that meets the target only on these queries would
    miss it on new ones), searched over every way of searching, every chain of its stages and a grid of each
    stage's confidence quantiles; on equal GFLOPs the more accurate wins. The best policy of every chain that meets
    the goal is kept under `calibration["chains"]`."""
    groups = by_search(stages)
    xl = groups[None][-1]
    best_per_chain = []
    for plan, group in groups.items():
        for chain in chains(group):
            grids = [sorted(set(np.quantile(s.confidence, np.linspace(0, 1, GRID)).tolist())) for s in chain[:-1]]
            results = [(list(t), simulate(chain, list(t), target, xl)) for t in itertools.product(*grids)]
            met = [(t, r) for t, r in results if r["surplus"] >= 0]
            if met:
                t, r = min(met, key=lambda tr: (tr[1]["mean_gflops"], -tr[1]["accuracy"]))
                best_per_chain.append(([s.spec for s in chain], plan, [float(x) for x in t], r))
    specs, plan, thresholds, result = min(best_per_chain, key=lambda c: (c[3]["mean_gflops"], -c[3]["accuracy"]))
    return Policy(specs, thresholds, signal, fingerprint, target, {  # XL alone always meets the goal
        "queries": len(xl.correct), "xl_accuracy": float(xl.correct.mean()), **result,
        "share_of_xl_gflops": result["mean_gflops"] / xl.gflops,
        "fixed": {name(s): {"accuracy": float(s.correct.mean()), "gflops": s.gflops} for s in stages},
        "chains": [{"stages": c, "search": p and p.key, "thresholds": t, "accuracy": r["accuracy"],
                    "mean_gflops": r["mean_gflops"]}
                   for c, p, t, r in sorted(best_per_chain, key=lambda c: c[3]["mean_gflops"])],
        **provenance.record()}, None if plan is None else {"dims": plan.dims, "shortlist": plan.shortlist})


def name(stage: Stage) -> str:
    """A stage's spec, with its way of searching when it is not the full vectors: `S`, `S@16-funnel`."""
    return stage.spec if stage.search is None else f"{stage.spec}@{stage.search.key}"


def label_codes(neighbours: list[list[dict]], width: int) -> np.ndarray:
    """The neighbours' label names as integer codes (-1: no label), one row per query, `width` columns."""
    codes: dict[str, int] = {}
    out = np.full((len(neighbours), width), -1)
    for row, hits in enumerate(neighbours):
        for col, hit in enumerate(hits[:width]):
            if hit["label"] is not None:
                out[row, col] = codes.setdefault(hit["label"], len(codes))
    return out


def searches(retriever) -> list[Plan | None]:
    """The ways a cascade may search: the full vectors (None), then each one the model and index allow beside
    them (`Retriever.budget_plans`)."""
    full = Plan(retriever.index.manifest["dim"])
    return [None, *(p for p in retriever.budget_plans(VOTES + 1) if p != full)]


def measure(retriever, images, truth: list[str], sources: list[str], specs: list[str], signal: str,
            plans: list[Plan | None] | None = None) -> list[Stage]:
    """Each stage's correctness and confidence on labelled query images (`truth`: class names), for each way of
    searching in `plans` (default: `searches`); a gallery item with the query's own `source` is left out of its
    neighbours, so gallery images serve as held-out queries."""
    index = retriever.index
    length = index.manifest["dim"]
    plans = searches(retriever) if plans is None else plans
    stages = []
    for text in specs:
        spec = retriever.encoder.spec(text)
        embeddings = retriever.encoder.encode(images, spec)
        for plan in plans:
            neighbours = retriever.search_embeddings(embeddings, VOTES + 1, None, index, plan)
            neighbours = [[h for h in hits if h["metadata"]["source"] != own][:VOTES]
                          for hits, own in zip(neighbours, sources, strict=True)]
            scores = np.array([[h["score"] for h in hits] + [0.0] * (VOTES - len(hits)) for hits in neighbours])
            correct = np.array([bool(hits) and hits[0]["label"] == label for hits, label in zip(neighbours, truth,
                                                                                              strict=True)])
            cost = retriever.encoder.gflops(spec) + search_gflops(plan or Plan(length), index.count, length)
            stages.append(Stage(spec.text, cost, correct, confidence(signal, scores, label_codes(neighbours, VOTES)),
                                plan))
    return stages


def labelled(retriever, dataset: str, split: str, count: int | None = None, data_dir: Path | None = None,
             seed: int = 0) -> tuple:
    """(images, class names, sources) of `count` seeded draws from a dataset split at the model's input size (all
    of it without `count`): the labelled queries `measure` takes."""
    encoder = retriever.encoder
    found = data.load(dataset, split, encoder.image_size, encoder.channels, data_dir)
    rows = np.arange(len(found.images)) if count is None else np.sort(
        np.random.default_rng(seed).choice(len(found.images), min(count, len(found.images)), replace=False))
    return (found.images[rows], [found.classes[int(found.labels[i])] for i in rows],
            [found.sources[i] for i in rows])
