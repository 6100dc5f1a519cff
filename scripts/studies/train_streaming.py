"""Training memory and time by data path: CIFAR-10 decoded whole into memory (`folder:` with `--in-memory`),
streamed from its JPEG folder (`folder:`), and streamed from WebDataset shards (`wds:`), at two training-set sizes.

Every training runs `python -m matvit train` in a fresh process; a sampler reads /proc every half second for the
resident memory of the whole process tree (the trainer and its DataLoader workers): the sum of their RSS, which
counts pages the forked workers share with the trainer once per process, and the sum of their PSS, which shares
them out. The trainer's own peak RSS comes from the kernel when it exits (`os.wait4`'s rusage). Each finished run
is cached (`CACHE/results/NAME.json`), so an interrupted benchmark continues where it stopped.

    python -m scripts.studies.train_streaming --cifar /data/cifar10 --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from matplotlib.figure import Figure

from matvit import data, provenance
from matvit.errors import UserError
from matvit.shard_writer import write_shards
from matvit.shards import META_FILE

from . import make_parser
from . import run as run_study

NAME = "train-streaming"
KINDS = {"memory": "folder:, decoded whole into memory (--in-memory)", "folder": "folder:, streamed",
         "wds": "wds: shards, streamed"}


@dataclass
class Run:
    """One training: how its data is read (`KINDS`), how many training images it has, and for how many epochs
    (None: `--epochs`)."""

    kind: str
    train_images: int
    epochs: int | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.train_images // 1000}k" + (f"-e{self.epochs}" if self.epochs else "")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("scripts.studies.train_streaming", "Training memory and time by data path: in memory, a "
                                                            "streamed JPEG folder and WebDataset shards.")
    parser.add_argument("--cifar", type=Path, required=True,
                        help="CIFAR-10 as JPEG folders: train/<class>/*.jpg and test/<class>/*.jpg")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help=f"where {NAME}.json/.md/.png go")
    parser.add_argument("--cache", type=Path, default=Path(f"runs/{NAME}"),
                        help="subset folder, shards, trainings and per-run results (reused when present)")
    parser.add_argument("--preset", default="matvit-small-cifar")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes of each training")
    parser.add_argument("--subset", type=int, default=10_000, help="training images of the smaller runs")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--runs", default="memory-10k,wds-10k,memory-50k,wds-50k,folder-50k",
                        help="which trainings, in order: KIND-SIZE[-eEPOCHS], KIND one of memory, folder, wds "
                             "(e.g. wds-10k-e5: the small set for as many steps as the large one once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each training (OMP_NUM_THREADS); its DataLoader workers share the cores")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    return parser


def parse_runs(text: str, full: int, subset: int) -> list[Run]:
    runs = []
    sizes = {f"{full // 1000}k": full, f"{subset // 1000}k": subset}
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, size, *epochs = item.split("-")
        if kind not in KINDS or size not in sizes or len(epochs) > 1 or not all(
                e[:1] == "e" and e[1:].isdigit() and int(e[1:]) > 0 for e in epochs):
            raise UserError(f"unknown run {item!r}: use KIND-SIZE[-eEPOCHS], KIND one of {', '.join(KINDS)} and SIZE "
                            f"one of {', '.join(sizes)}")
        runs.append(Run(kind, sizes[size], int(epochs[0][1:]) if epochs else None))
    return runs


# --- data ------------------------------------------------------------------------------------------------------

def subset_folder(cifar: Path, out: Path, n: int) -> Path:
    """`out` with the first n / classes training images of each class and every test image, as symbolic links."""
    classes = data.list_classes(cifar / "train")
    done = out / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for split, keep in (("train", n // len(classes)), ("test", None)):
        for c in classes:
            (out / split / c).mkdir(parents=True)
            for f in data.list_images(cifar / split / c)[:keep]:
                (out / split / c / f.name).symlink_to(f.resolve())
    done.write_text(str(n))
    return out


def shards_for(folder: Path, out: Path, max_count: int, log=print) -> dict:
    """The shards of `folder` in `out`, written unless a finished set (its dataset.json) is there."""
    meta_file = out / META_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("max_count") == max_count and meta.get("dataset") == f"folder:{folder}":
            return meta
    log(f"writing shards of {folder} into {out}")
    start = time.perf_counter()
    meta = write_shards(f"folder:{folder}", out, max_count=max_count, overwrite=True)
    meta.update(max_count=max_count, seconds=round(time.perf_counter() - start, 1),
                bytes=sum(p.stat().st_size for p in out.glob("*.tar")))
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


# --- measuring ------------------------------------------------------------------------------------------------

def descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


class Memory(NamedTuple):
    """A process's resident memory in KiB: all of it (RSS), shared pages divided among their sharers (PSS), and the
    anonymous part alone (heap, tensors; not the shared libraries' file pages), whole and divided."""

    rss: int = 0
    pss: int = 0
    anon: int = 0
    anon_pss: int = 0


def memory_kb(pid: int) -> Memory:
    """The memory of a process from /proc/PID/smaps_rollup; all zero once it is gone."""
    try:
        rows = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        return Memory(*(int(rows[k].split()[0]) for k in ("Rss", "Pss", "Anonymous", "Pss_Anon")))
    except (OSError, KeyError, ValueError):
        return Memory()


METRICS = ("tree_rss", "tree_pss", "tree_anon", "main_anon", "workers_anon")  # KiB sums, see `TreeSampler`


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree (a trainer and its DataLoader workers) every `interval` seconds until
    stopped: the tree's summed RSS, PSS and anonymous PSS, the trainer's anonymous memory, the workers' anonymous
    PSS, and the number of processes, each sample with its time since `start` (a `time.time()`)."""

    def __init__(self, pid: int, interval: float, start: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.start_time, self.stopped = pid, interval, start, threading.Event()
        self.points: list[tuple[float, dict[str, int], int]] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            tree = descendants(self.pid)
            usage = [memory_kb(p) for p in tree]
            workers = sum(m.anon_pss for m in usage[1:])
            now = dict(zip(METRICS, (sum(m.rss for m in usage), sum(m.pss for m in usage),
                                     usage[0].anon_pss + workers, usage[0].anon, workers), strict=True))
            self.points.append((time.time() - self.start_time, now, len(tree)))
            self.stopped.wait(self.interval)

    def peaks(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        """Peak of every metric (MB) over the samples taken between `since` and `until` seconds."""
        chosen = [m for t, m, _ in self.points if since <= t < until] or [dict.fromkeys(METRICS, 0)]
        return {k: round(max(m[k] for m in chosen) / 1024, 1) for k in METRICS}

    def timeline(self, every: float = 5.0) -> list[tuple[float, float, float, int]]:
        """(seconds, trainer + workers anonymous MB, trainer anonymous MB, processes), a point per `every` seconds."""
        out: list[tuple[float, float, float, int]] = []
        for t, m, n in self.points:
            if not out or t - out[-1][0] >= every:
                out.append((round(t, 1), round(m["tree_anon"] / 1024, 1), round(m["main_anon"] / 1024, 1), n))
        return out


def train(run: Run, dataset: str, args: argparse.Namespace, log=print) -> dict:
    """One training in a fresh `python -m matvit train` process, measured; returns its result row. Its samples
    split at the moment the last epoch's line lands in train_log.jsonl: loading and training before, the final
    evaluation after."""
    out, epochs = args.cache / "train" / run.name, run.epochs or args.epochs
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "matvit", "train", "--preset", args.preset, "--dataset", dataset,
               "--out", str(out), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--device", "cpu", "--seed", "0",
               "--dense-epochs", "0", "--augment", "crop-flip"]  # the recipe its committed results measured
    command += ["--in-memory"] if run.kind == "memory" else []
    log(f"{run.name}: {' '.join(command)}")
    out.mkdir(parents=True)
    start = time.time()
    with open(args.cache / "logs" / f"{run.name}.log", "w") as output:
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads),
               "MKL_NUM_THREADS": str(args.threads)}
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid, args.interval, start)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    sampler.stopped.set()
    sampler.join()
    eval_file = out / "eval.json"
    if proc.returncode or not eval_file.is_file():
        raise UserError(f"{run.name} failed (exit code {proc.returncode}); see {args.cache / 'logs' / run.name}.log")
    result = json.loads(eval_file.read_text())
    trained = (out / "train_log.jsonl").stat().st_mtime - start
    return {"name": run.name, **asdict(run), "data": KINDS[run.kind], "dataset": dataset,
            "command": " ".join(["python", "-m", "matvit", *command[3:]]),
            "epochs": epochs, "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
            "preset": args.preset, "steps": run.train_images // args.batch_size * epochs,
            "wall_seconds": round(wall, 1), "train_seconds": result["train_seconds"],
            "trained_at_seconds": round(trained, 1),
            "peak_mb": {"run": sampler.peaks(), "training": sampler.peaks(until=trained),
                        "evaluation": sampler.peaks(since=trained)},
            "peak_main_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_processes": max((n for _, _, n in sampler.points), default=0),
            "memory_samples": len(sampler.points), "top1": result["top1"], "knn1": result["knn1"],
            "timeline": sampler.timeline()}


def _same_setting(row: dict, run: Run, args: argparse.Namespace) -> bool:
    keys = ("kind", "train_images", "epochs", "batch_size", "workers", "threads", "preset")
    given = (run.kind, run.train_images, run.epochs or args.epochs, args.batch_size, args.workers, args.threads,
             args.preset)
    return tuple(row.get(k) for k in keys) == given and "peak_mb" in row


def run(args: argparse.Namespace, log=print) -> dict:
    """Prepare the data, train (or reuse) every run, write NAME.json/.md/.png into `args.out`; returns the JSON."""
    origin = provenance.record()
    cifar = args.cifar.expanduser().resolve()
    if not (cifar / "train").is_dir() or not (cifar / "test").is_dir():
        raise UserError(f"--cifar {cifar}: expected train/<class>/ and test/<class>/ image folders in it")
    full = sum(len(data.list_images(cifar / "train" / c)) for c in data.list_classes(cifar / "train"))
    runs = parse_runs(args.runs, full, args.subset)
    args.cache = args.cache.resolve()
    for sub in ("results", "logs", "train"):
        (args.cache / sub).mkdir(parents=True, exist_ok=True)
    folders = {full: cifar}
    if any(r.train_images == args.subset for r in runs):
        folders[args.subset] = subset_folder(cifar, args.cache / f"cifar-{args.subset // 1000}k", args.subset)
    shards = {n: shards_for(folder, args.cache / f"shards-{n // 1000}k", args.max_count, log)
              for n, folder in folders.items() if any(r.kind == "wds" and r.train_images == n for r in runs)}
    rows = []
    for r in runs:
        cached = args.cache / "results" / f"{r.name}.json"
        if cached.is_file() and _same_setting(row := json.loads(cached.read_text()), r, args):
            log(f"{r.name}: reusing {cached}")
        else:
            shard_dir = args.cache / f"shards-{r.train_images // 1000}k"
            dataset = f"wds:{shard_dir}" if r.kind == "wds" else f"folder:{folders[r.train_images]}"
            row = train(r, dataset, args, log)
            cached.write_text(json.dumps(row, indent=2))
        train_peak = row["peak_mb"]["training"]
        log(f"{r.name}: peak anonymous memory while loading and training {train_peak['tree_anon']:.0f} MB (tree), "
            f"{train_peak['main_anon']:.0f} MB (trainer); wall {row['wall_seconds'] / 60:.1f} min")
        rows.append(row)
    result = {**origin, "preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size,
              "workers": args.workers, "threads": args.threads, "max_count": args.max_count,
              "shards": {f"{n // 1000}k": {k: m.get(k) for k in ("counts", "shards", "seconds", "bytes")}
                         for n, m in shards.items()},
              "runs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    (out / f"{NAME}.md").write_text(markdown(result))
    bars_png(result, out / f"{NAME}.png")
    return result


# --- reporting ------------------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Training memory and time: in memory, streamed folder, streamed WebDataset shards ({r['preset']})",
             "", f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}  ",
             f"Each run: `python -m matvit train` in a fresh process, batch {r['batch_size']}, "
             f"{r['workers']} DataLoader workers, {r['threads']} torch thread(s) (OMP_NUM_THREADS), CPU: start-up, "
             "loading (decoding everything, for `--in-memory`), the training epochs, then the evaluation every "
             "training ends with (test top-1, and 1-NN over the whole training split as gallery, for each of the "
             "four granularities; the test split is CIFAR-10's 10,000 images in every run).", "",
             "## Peak memory (MB)", "",
             "| run | data | training images | epochs | trainer + workers, anonymous: loading + training | "
             "evaluation | trainer, anonymous: loading + training | evaluation | whole run: PSS, tree | RSS, tree | "
             "trainer RSS high-water |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["runs"]:
        train, evaluation, whole = (row["peak_mb"][k] for k in ("training", "evaluation", "run"))
        lines.append(f"| {row['name']} | {row['data']} | {row['train_images']:,} | {row['epochs']} | "
                     f"**{train['tree_anon']:,.0f}** | {evaluation['tree_anon']:,.0f} | "
                     f"**{train['main_anon']:,.0f}** | {evaluation['main_anon']:,.0f} | {whole['tree_pss']:,.0f} | "
                     f"{whole['tree_rss']:,.0f} | {row['peak_main_rss_mb']:,.0f} |")
    lines += ["", "Sampled from /proc every 0.5 s; a run's samples split where the last epoch's line lands in "
              "train_log.jsonl. Anonymous: heap and tensors, the memory data can add (trainer + workers: the "
              "workers' and the trainer's proportional shares, so that pages shared after the fork count once). "
              "PSS and RSS also count the shared libraries' file pages (hundreds of MB for torch): PSS divides them "
              "among all the processes mapping them, other jobs on the machine included, and the kernel may drop "
              "them, so they move between identical runs; RSS counts shared pages once per process. Trainer RSS "
              "high-water: the kernel's peak for the main process (`os.wait4`)."]
    growth = []
    for kind in KINDS:
        same = sorted((row for row in r["runs"] if row["kind"] == kind and row["epochs"] == r["epochs"]),
                      key=lambda row: row["train_images"])
        if len(same) == 2:
            growth.append(_change(KINDS[kind], *same))
    for row in r["runs"]:
        if row["epochs"] != r["epochs"]:
            twin = next((o for o in r["runs"] if o["kind"] == row["kind"] and o["epochs"] == r["epochs"]
                         and o["steps"] == row["steps"] and o["train_images"] != row["train_images"]), None)
            if twin:
                growth.append(_change(f"{KINDS[row['kind']]}, the same {row['steps']:,} steps", row, twin))
    if growth:
        lines += ["", "## Memory as the training set grows", "", *growth]
    lines += ["", "## Time and accuracy", "",
              "| run | training (min) | s / step | wall (min) | XL top-1 | XL 1-NN | S top-1 | S 1-NN |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["runs"]:
        lines.append(f"| {row['name']} | {row['train_seconds'] / 60:.1f} | "
                     f"{row['train_seconds'] / max(1, row['steps']):.2f} | {row['wall_seconds'] / 60:.1f} | "
                     f"{row['top1']['XL']:.4f} | {row['knn1']['XL']:.4f} | {row['top1']['S']:.4f} | "
                     f"{row['knn1']['S']:.4f} |")
    lines += ["", "Training: the epoch loop alone (the trainer's own clock); wall: the whole process. The machine was "
              "shared with other jobs while these ran: compare times loosely."]
    for n, s in r.get("shards", {}).items():
        if s.get("seconds") is not None:
            lines += ["", f"Shards ({n}): {sum(s['counts'].values()):,} samples in {sum(s['shards'].values())} tar "
                      f"files of at most {r['max_count']:,} samples, {s['bytes'] / 2**20:,.0f} MB, written in "
                      f"{s['seconds']:.0f} s (JPEG bytes copied, not re-encoded)."]
    if r["runs"]:
        lines += ["", f"![memory and time]({NAME}.png)"]
    return "\n".join(lines) + "\n"


def _change(what: str, small: dict, big: dict) -> str:
    def delta(phase: str, key: str) -> str:
        a, b = small["peak_mb"][phase][key], big["peak_mb"][phase][key]
        return f"{a:,.0f} -> {b:,.0f} MB ({b - a:+,.0f})"

    return (f"- {what}: {small['name']} -> {big['name']}: anonymous memory while loading and training, trainer + "
            f"workers {delta('training', 'tree_anon')}, trainer {delta('training', 'main_anon')}; during the "
            f"evaluation, trainer + workers {delta('evaluation', 'tree_anon')}")


def bars_png(r: dict, path: Path) -> None:
    """Peak anonymous memory and time per run as grouped bars, and each run's memory over time."""
    rows = r["runs"]
    names = [row["name"] for row in rows]
    x = list(range(len(rows)))
    fig = Figure(figsize=(16, 4.8), layout="tight")
    mem, secs, over_time = fig.subplots(1, 3)
    bars = ((-0.27, "training", "tree_anon", "trainer + workers, loading + training"),
            (0.0, "training", "main_anon", "trainer, loading + training"),
            (0.27, "evaluation", "tree_anon", "trainer + workers, evaluation"))
    for offset, phase, key, label in bars:
        mem.bar([i + offset for i in x], [row["peak_mb"][phase][key] for row in rows], width=0.27, label=label)
    mem.set_ylabel("peak anonymous memory (MB)")
    mem.set_title("Peak memory")
    for offset, key, label in ((-0.2, "train_seconds", "training epoch loop"), (0.2, "wall_seconds", "whole run")):
        secs.bar([i + offset for i in x], [row[key] / 60 for row in rows], width=0.4, label=label)
    secs.set_ylabel("minutes")
    secs.set_title("Time")
    for ax in (mem, secs):
        ax.set_xticks(x, names, rotation=30)
        ax.legend(fontsize=7)
    for row in rows:
        points = row["timeline"]
        (line,) = over_time.plot([p[0] / 60 for p in points], [p[1] for p in points], label=row["name"], lw=1)
        at = min(points, key=lambda p: abs(p[0] - row["trained_at_seconds"]))
        over_time.plot([at[0] / 60], [at[1]], "o", color=line.get_color(), ms=4)
    over_time.set_xlabel("minutes since start (dot: training ends, evaluation starts)")
    over_time.set_ylabel("anonymous memory, trainer + workers (MB)")
    over_time.set_title("Memory over each run")
    over_time.legend(fontsize=7)
    fig.suptitle(f"{r['preset']}, batch {r['batch_size']}, {r['workers']} workers")
    fig.savefig(path, dpi=120)


def _cli(args: argparse.Namespace) -> None:
    print(markdown(run(args)))
    print(f"wrote {args.out / NAME}.json, .md and .png")


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _cli, argv)


if __name__ == "__main__":
    sys.exit(main())
