"""A bounded load run against the REST API on loopback: N clients for T seconds per submodel, then stop.

    python scripts/load_test.py --index IDX --checkpoint DIR --out docs/results/api-load \
        [--submodels S,XL] [--clients 1,8] [--seconds 20]

It starts `matvit serve` on a free loopback port, posts real query images (multipart) from every
client in a closed loop, and reports QPS, p50 and p99 latency and errors per (submodel, clients).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from matvit import checkpoint, data, provenance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_images(checkpoint_dir: Path, n: int = 64) -> list[bytes]:
    """PNG files of the checkpoint's test split (digits when its dataset is not available)."""
    meta = checkpoint.read_config(checkpoint_dir)
    cfg = meta["model"]
    try:
        test = data.load(meta.get("dataset", "digits"), "test", cfg["img_size"], cfg["in_chans"])
    except data.DatasetError:
        test = data.load("digits", "test", cfg["img_size"], cfg["in_chans"])
    out = []
    for img in test.images[:n]:
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def run_load(url: str, images: list[bytes], submodel: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = worker
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = http.post("/v1/search", files={"file": ("q.png", images[i % len(images)], "image/png")},
                                  data={"k": "10", "submodel": submodel})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"submodel": submodel, "clients": clients, "seconds": round(wall, 2), "requests": len(latencies),
            "errors": errors[0], "qps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


def markdown(report: dict) -> str:
    lines = ["# REST API load test (loopback)", "", f"Command: `{report['command']}`  ",
             f"Commit: `{report['commit']}`  ",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores "
             "(server and clients share it).",
             "", f"Index: {report['index_count']:,} items; each request is one multipart PNG query, k = 10.", "",
             "| submodel | clients | requests | errors | QPS | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['submodel']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['qps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--submodels", default="S,XL", help="comma-separated named submodels")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--index", str(args.index),
                               "--checkpoint", str(args.checkpoint), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become ready in 2 minutes")
        images = query_images(args.checkpoint)
        count = httpx.get(f"{url}/v1/index").json()["count"]
        runs = []
        for submodel in args.submodels.split(","):
            run_load(url, images, submodel, 1, 2)  # warm-up: extraction and caches
            for clients in (int(c) for c in args.clients.split(",")):
                runs.append(run_load(url, images, submodel, clients, args.seconds))
                print(json.dumps(runs[-1]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {**provenance.record(["python", "scripts/load_test.py", *sys.argv[1:]]), "index_count": count,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
