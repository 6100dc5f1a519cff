"""A bounded load run against the REST API on loopback: N clients for T seconds, then stop.

    python scripts/load_test.py --index IDX --checkpoint DIR --out docs/results/api-load \
        [--submodels S,XL] [--clients 1,8] [--seconds 20] [--queries DATASET] [--serve-arg=--backend=eager ...]
    python scripts/load_test.py --index IDX --checkpoint DIR --out docs/results/api-live-update --live \
        [--clients 4] [--seconds 60]

It starts `matvit serve` on a free loopback port and posts real query images (multipart) from every
client in a closed loop. The default mode reports QPS, p50 and p99 latency and errors per
(submodel, clients), and where a query's time goes: the server's own timings (decode, queue for its
encode batch, encode, search, metadata) and the rest (HTTP: parsing, transfer, the event loop, the
client). `--live` serves a copy of the index and, while the clients query it, adds and deletes
items through the API and adds folders with `matvit index add` in another process: it
records query errors, deleted ids seen again, the time until a new item is findable, and latency
during the writes and outside them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from matvit import checkpoint, data, provenance
from matvit.images import to_png


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(checkpoint_dir: Path, dataset: str | None = None, count: int | None = None) -> list[bytes]:
    """PNG files (at the model's size) of the first `count` test images of `dataset`, by default the
    checkpoint's (digits when that is not available)."""
    meta = checkpoint.read_config(checkpoint_dir)
    cfg = meta["model"]
    try:
        test = data.load(dataset or meta.get("dataset") or "digits", "test", cfg["img_size"], cfg["in_chans"])
    except data.DatasetError:
        if dataset:
            raise
        test = data.load("digits", "test", cfg["img_size"], cfg["in_chans"])
    return [to_png(img) for img in test.images[:count]]


@contextlib.contextmanager
def server(index: Path, checkpoint_dir: Path, serve_args: list[str] = ()) -> Iterator[str]:
    """`matvit serve` (with `serve_args`) on a free loopback port, until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--index", str(index),
                                "--checkpoint", str(checkpoint_dir), "--port", str(port), *serve_args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(2400):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            raise SystemExit("the server did not become ready in 10 minutes")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


PHASES = ("decode", "queue", "encode", "search", "metadata", "total")  # the server's timings of a query


class QueryLoad:
    """`clients` threads posting query images until `deadline`; every request's interval, status and ids, and
    the server's timings and encode batch of each answered one."""

    def __init__(self, url: str, images: list[bytes], submodel: str, clients: int, deadline: float) -> None:
        self.url, self.images, self.submodel, self.deadline = url, images, submodel, deadline
        self.records: list[tuple[float, float, int, list[int]]] = []  # start, end, status (0: no answer), ids
        self.served: list[dict] = []  # per answered request: client seconds, server timings (ms), encode batch
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(w, clients)) for w in range(clients)]

    def client(self, worker: int, clients: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            i = worker
            while time.perf_counter() < self.deadline:
                start = time.perf_counter()
                try:
                    r = http.post("/v1/search", files={"file": ("q.png", self.images[i % len(self.images)],
                                                                "image/png")},
                                  data={"k": "10", "submodel": self.submodel})
                    body = r.json()
                    status, ids = r.status_code, [h["id"] for h in body.get("results", [])]
                except (httpx.HTTPError, ValueError):
                    status, ids, body = 0, [], {}
                end = time.perf_counter()
                with self.lock:
                    self.records.append((start, end, status, ids))
                    if status == 200:
                        self.served.append({"seconds": end - start, "encode_batch": body["encode_batch"],
                                            "backend": body["submodel"]["backend"], **body["timings_ms"]})
                i += clients

    def __enter__(self) -> QueryLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads:
            t.join()


def run_load(url: str, images: list[bytes], submodel: str, clients: int, seconds: float) -> dict:
    start = time.perf_counter()
    with QueryLoad(url, images, submodel, clients, start + seconds) as load:
        pass
    wall = time.perf_counter() - start
    ok = [end - begin for begin, end, status, _ in load.records if status == 200]
    return {"submodel": submodel, "clients": clients, "seconds": round(wall, 2), "requests": len(ok),
            "errors": len(load.records) - len(ok), "qps": round(len(ok) / wall, 1), **percentiles(ok),
            "backends": sorted({s["backend"] for s in load.served}), "breakdown_ms": breakdown(load.served)}


def breakdown(served: list[dict]) -> dict:
    """Median milliseconds of each phase of a query, and of the rest of the client's wait (`http`: request
    parsing, transfer, the event loop and thread hand-offs, the client), plus the mean encode batch."""
    if not served:
        return {}
    out = {phase: round(float(np.median([s[phase] for s in served])), 3) for phase in PHASES}
    out["client"] = round(float(np.median([s["seconds"] * 1e3 for s in served])), 3)
    out["http"] = round(float(np.median([s["seconds"] * 1e3 - s["total"] for s in served])), 3)
    out["mean_encode_batch"] = round(float(np.mean([s["encode_batch"] for s in served])), 2)
    return out


def targets(runs: list[dict], small: str = "S", large: str = "XL") -> list[dict]:
    """The smaller submodel's QPS at the most clients against the larger's (target at least 1.6x), and its p50
    at one client (target at most 0.6x), when both were run."""
    def run(submodel: str, clients: int) -> dict | None:
        return next((r for r in runs if r["submodel"] == submodel and r["clients"] == clients), None)

    out = []
    most = max(r["clients"] for r in runs)
    if (a := run(small, most)) and (b := run(large, most)) and b["qps"]:
        ratio = a["qps"] / b["qps"]
        out.append({"what": f"{small} QPS / {large} QPS at {most} clients", "ratio": round(ratio, 3),
                    "target": ">= 1.6", "met": ratio >= 1.6})
    if (a := run(small, 1)) and (b := run(large, 1)) and b["p50_ms"]:
        ratio = a["p50_ms"] / b["p50_ms"]
        out.append({"what": f"{small} p50 / {large} p50 at 1 client", "ratio": round(ratio, 3),
                    "target": "<= 0.6", "met": ratio <= 0.6})
    return out


# --- live updates ------------------------------------------------------------------------------
def top_hit(http: httpx.Client, image: bytes) -> dict | None:
    r = http.post("/v1/search", json={"image_b64": base64.b64encode(image).decode(), "k": 1, "submodel": "XL"})
    results = r.json().get("results") if r.status_code == 200 else None
    return results[0] if results else None


def wait_findable(http: httpx.Client, image: bytes, is_it, deadline: float) -> float | None:
    """Seconds until the XL top-1 of `image` satisfies `is_it`, or None by `deadline`."""
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        hit = top_hit(http, image)
        if hit is not None and is_it(hit):
            return time.perf_counter() - start
        time.sleep(0.02)
    return None


def api_writer(url: str, images: list[bytes], deadline: float, writes: list, deleted: dict) -> None:
    """Add one image through the API, wait until it is findable, delete the one added before; repeat."""
    previous = None
    with httpx.Client(base_url=url, timeout=120) as http:
        for n, image in enumerate(images):
            if time.perf_counter() > deadline - 5:
                break
            start = time.perf_counter()
            r = http.post("/v1/items", files=[("files", (f"api-{n}.png", image, "image/png"))],
                          data={"labels": "live", "names": f"api-{n}.png"})
            end = time.perf_counter()
            record = {"kind": "api add", "start": start, "end": end, "status": r.status_code}
            if r.status_code == 201:
                new_id = r.json()["items"][0]["id"]
                record["findable_s"] = wait_findable(http, image, lambda h, i=new_id: h["id"] == i, deadline + 30)
            writes.append(record)
            if previous is not None:
                start = time.perf_counter()
                r = http.delete(f"/v1/items/{previous}")
                end = time.perf_counter()
                writes.append({"kind": "api delete", "start": start, "end": end, "status": r.status_code})
                if r.status_code == 200:
                    deleted[previous] = end
            previous = new_id if record["status"] == 201 else None
            time.sleep(1.0)


def cli_writer(index: Path, checkpoint_dir: Path, images: list[bytes], url: str, deadline: float, writes: list,
               batch: int = 200, pause: float = 10.0) -> None:
    """Every `pause` seconds, `matvit index add` a folder of `batch` new images in another process."""
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=url, timeout=120) as http:
        for n in range(len(images) // batch):
            if time.perf_counter() > deadline - 15:
                break
            folder = Path(tmp) / f"cli-{n}"
            folder.mkdir()
            for i, image in enumerate(images[n * batch:(n + 1) * batch]):
                (folder / f"{i:04d}.png").write_bytes(image)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "app.cli", "index", "add", "--index", str(index),
                                   "--checkpoint", str(checkpoint_dir), "--images", str(folder), "--workers", "0",
                                   "--wait", "120"], capture_output=True, text=True)
            end = time.perf_counter()
            record = {"kind": "cli add", "start": start, "end": end, "status": done.returncode, "images": batch}
            if done.returncode == 0:
                record["findable_s"] = wait_findable(http, images[n * batch], lambda h: h["metadata"]["source"]
                                                     == "0000.png" and h["score"] > 0.999, deadline + 30)
            else:
                record["stderr"] = done.stderr.strip().splitlines()[-1:]
            writes.append(record)
            time.sleep(pause)


def run_live(url: str, index: Path, checkpoint_dir: Path, images: list[bytes], clients: int,
             seconds: float) -> dict:
    queries, fresh = images[:64], images[64:]
    start = time.perf_counter()
    deadline = start + seconds
    api_writes, cli_writes, deleted = [], [], {}
    writers = [threading.Thread(target=api_writer, args=(url, fresh[:200], deadline, api_writes, deleted)),
               threading.Thread(target=cli_writer, args=(index, checkpoint_dir, fresh[200:], url, deadline,
                                                         cli_writes))]
    with QueryLoad(url, queries, "S", clients, deadline) as load:
        for w in writers:
            w.start()
    for w in writers:
        w.join()
    wall = time.perf_counter() - start
    writes = api_writes + cli_writes
    windows = [(w["start"], w["end"] + 1.0) for w in writes]
    during, outside = [], []
    for begin, end, status, _ in load.records:
        if status == 200:
            overlaps = any(begin < hi and end > lo for lo, hi in windows)
            (during if overlaps else outside).append(end - begin)
    resurrected = sum(1 for begin, _, _, ids in load.records for i in ids if i in deleted and deleted[i] < begin)

    def ok(write: dict) -> bool:
        return write["status"] == 0 if write["kind"] == "cli add" else write["status"] in (200, 201)

    def summary(kind: str) -> dict:
        rows = [w for w in writes if w["kind"] == kind]
        found = [w["findable_s"] for w in rows if w.get("findable_s") is not None]
        out = {"count": len(rows), "failed": sum(not ok(w) for w in rows),
               "seconds_p50": round(float(np.median([w["end"] - w["start"] for w in rows])), 3) if rows else None}
        if kind != "api delete":
            out.update(findable_s_p50=round(float(np.median(found)), 3) if found else None,
                       findable_s_max=round(float(max(found)), 3) if found else None,
                       never_found=sum(1 for w in rows if ok(w) and w.get("findable_s") is None))
        return out

    errors = sum(1 for r in load.records if r[2] != 200)
    return {"seconds": round(wall, 1), "clients": clients, "submodel": "S", "queries": len(load.records),
            "query_errors": errors, "qps": round((len(load.records) - errors) / wall, 1),
            "deleted_ids_seen_after_delete": resurrected,
            "latency_all": percentiles(during + outside), "latency_during_writes": {"requests": len(during),
                                                                                   **percentiles(during)},
            "latency_outside_writes": {"requests": len(outside), **percentiles(outside)},
            "writes": {kind: summary(kind) for kind in ("api add", "api delete", "cli add")},
            "write_failures": [{k: v for k, v in w.items() if k not in ("start", "end")} for w in writes if not ok(w)]}


# --- reports -----------------------------------------------------------------------------------
def header(report: dict, title: str) -> list[str]:
    return [f"# {title}", "", f"Command: `{report['command']}`  ", f"Commit: `{report['commit']}`  ",
            f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (server, clients and writers "
            "share it).", ""]


def markdown(report: dict) -> str:
    lines = header(report, "REST API load test (loopback)") + [
        f"Index: {report['index_count']:,} items ({report['index_key']}); each request is one multipart PNG query "
        f"of {report['image_size']}, k = 10. Server options: `{' '.join(report['serve_args']) or 'defaults'}`.", "",
        "| submodel | backend | clients | requests | errors | QPS | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['submodel']} | {', '.join(r.get('backends', []))} | {r['clients']} | {r['requests']} | "
                     f"{r['errors']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} |")
    if report.get("targets"):
        lines += ["", "| target | measured | target | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['what']} | {t['ratio']} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
                  for t in report["targets"]]
    lines += ["", "Where a query's time goes (medians, ms; the server's timings are its own per query: `queue` is "
              "the wait for its encode batch, `search` the index's, `metadata` the neighbours' items; `http` is the "
              "client's wait minus the server's total):", "",
              "| submodel | clients | decode | queue | encode | search | metadata | server total | http | client | "
              "mean encode batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        b = r["breakdown_ms"]
        if b:
            lines.append(f"| {r['submodel']} | {r['clients']} | {b['decode']} | {b['queue']} | {b['encode']} | "
                         f"{b['search']} | {b.get('metadata', '-')} | {b['total']} | {b['http']} | {b['client']} | "
                         f"{b['mean_encode_batch']} |")
    return "\n".join(lines) + "\n"


def live_markdown(report: dict) -> str:
    r = report["live"]
    w = r["writes"]
    lines = header(report, "Live index updates under query load (loopback)") + [
        f"A copy of an index of {report['index_count']:,} items served by `matvit serve`; for {r['seconds']} s, "
        f"{r['clients']} clients posted PNG queries (submodel {r['submodel']}, k = 10) in a closed loop while one "
        "thread added an image through `POST /v1/items`, searched until it was findable, and deleted the image "
        "it had added before (`DELETE /v1/items/{id}`), and another process ran `matvit index add` with "
        "200 new images every 10 s (`--wait 120` for the writer lock).", "",
        "| measure | value |", "|---|---:|",
        f"| queries | {r['queries']:,} |", f"| query errors | {r['query_errors']} |",
        f"| QPS | {r['qps']} |",
        f"| deleted ids returned after their delete answered | {r['deleted_ids_seen_after_delete']} |",
        f"| p50 / p99 ms, all queries | {r['latency_all']['p50_ms']} / {r['latency_all']['p99_ms']} |",
        f"| p50 / p99 ms, queries overlapping a write (+1 s) | {r['latency_during_writes']['p50_ms']} / "
        f"{r['latency_during_writes']['p99_ms']} ({r['latency_during_writes']['requests']:,} queries) |",
        f"| p50 / p99 ms, other queries | {r['latency_outside_writes']['p50_ms']} / "
        f"{r['latency_outside_writes']['p99_ms']} ({r['latency_outside_writes']['requests']:,} queries) |",
        "", "| write | count | failed | median s | findable after (p50 / max s) | never findable |",
        "|---|---:|---:|---:|---:|---:|"]
    for kind, s in w.items():
        found = f"{s['findable_s_p50']} / {s['findable_s_max']}" if "findable_s_p50" in s else "-"
        lines.append(f"| {kind} | {s['count']} | {s['failed']} | {s['seconds_p50']} | {found} | "
                     f"{s.get('never_found', '-')} |")
    lines += ["", "Findable after: from the end of the write (the API's answer, or the `matvit index add` "
              "process's exit) until an XL search for the same image returns it first."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--submodels", default="S,XL", help="comma-separated named submodels")
    parser.add_argument("--clients", default=None, help="default 1,8 (4 with --live)")
    parser.add_argument("--seconds", type=float, default=None, help="per run (default 20, 60 with --live)")
    parser.add_argument("--live", action="store_true", help="query while adding and deleting items")
    parser.add_argument("--queries", help="dataset of the query images (default: the checkpoint's)")
    parser.add_argument("--serve-arg", action="append", default=[], dest="serve_args",
                        help="an option for `matvit serve`, e.g. --serve-arg=--backend=eager (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args()

    images = test_images(args.checkpoint, args.queries, None if args.live else 64)
    report = provenance.record(["python", "scripts/load_test.py", *sys.argv[1:]])
    if args.live:
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            shutil.copytree(args.index, index, ignore=shutil.ignore_patterns("building", "LOCK"))
            with server(index, args.checkpoint, args.serve_args) as url:
                report["index_count"] = httpx.get(f"{url}/v1/index").json()["count"]
                run_load(url, images[:64], "S", 1, 2)  # warm-up: extraction and caches
                report["live"] = run_live(url, index, args.checkpoint, images, int(args.clients or 4),
                                          args.seconds or 60)
        text = live_markdown(report)
    else:
        with server(args.index, args.checkpoint, args.serve_args) as url:
            info = httpx.get(f"{url}/v1/index").json()
            report.update(index_count=info["count"], index_key=info["index_key"], serve_args=args.serve_args,
                          image_size="x".join(map(str, Image.open(io.BytesIO(images[0])).size)), runs=[])
            for submodel in args.submodels.split(","):
                run_load(url, images[:64], submodel, 1, 2)  # warm-up: extraction and caches
                for clients in (int(c) for c in (args.clients or "1,8").split(",")):
                    report["runs"].append(run_load(url, images[:64], submodel, clients, args.seconds or 20))
                    print(json.dumps(report["runs"][-1]))
        report["targets"] = targets(report["runs"])
        text = markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
