"""Peak memory of the API server under concurrent worst-case image uploads, against its documented ceiling.

    python scripts/decode_memory.py --out docs/results/decode-memory [--clients 16] \
        [--compare DIR --compare-clients 4]

It writes a random (seeded) checkpoint of `--preset` (224-pixel input), indexes a few digits with it, starts
`matvit serve` with default settings on loopback, warms it with one query, then for each kind of upload fires
`--clients` concurrent uploads of it and reads the server's peak resident memory (VmHWM of
/proc/PID/status, reset before each phase through /proc/PID/clear_refs). The kinds are the largest images the
default limits accept, per format (a 16-bit PNG and an RGB JPEG near the 40M-pixel limit; RGB and RGBA PNGs at
the decode-byte limit), an RGBA PNG over that limit, and all of them mixed. `--compare DIR` measures a second
checkout (e.g. `git archive main | tar -x -C DIR`) the same way, with `--compare-clients` uploads at once.

The ceiling is the server's resident memory once warm (model, index, runtime), plus `decode_slots` times
`max_decode_bytes` (what decoding can hold at once), plus the request bodies in flight (`clients` times the
largest upload). Writes result.json and README.md under --out, with the command, commit and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
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
import torch
from PIL import Image

from app.api import Settings
from matvit import checkpoint, data, images, provenance
from matvit.model import MatViT
from matvit.registry import get_preset
from retrieval import build
from retrieval.encoder import Encoder

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def ramp(side: int) -> np.ndarray:
    """A side x side uint16 pattern that compresses well (uploads stay under the 10 MiB file limit)."""
    y = np.arange(side, dtype=np.uint32)
    return ((y[:, None] * 7 + y[None, :] * 3) % 65536).astype(np.uint16)


def colour(side: int, alpha: bool) -> Image.Image:
    grey = ramp(side)
    bands = [(grey >> 8).astype(np.uint8), (grey & 255).astype(np.uint8), np.full_like(grey, 128, np.uint8)]
    return Image.fromarray(np.stack(bands + [(grey >> 8).astype(np.uint8)] * alpha, -1))


def largest_side(mode: str, limit: int, target: int, max_pixels: int) -> int:
    """The largest square side of a `mode` image that the limits accept."""
    side = int(max_pixels**0.5)
    while side * side > max_pixels or images.decode_cost(mode, side, side, target) > limit:
        side -= 10
    return side


def uploads(settings: Settings, img_size: int) -> dict[str, bytes]:
    """The worst cases the default limits accept, per format, and one over the decode-byte limit."""
    target = images.GAP * img_size
    near = int(settings.max_pixels**0.5) - 24  # a square just under the pixel limit
    rgb = largest_side("RGB", settings.max_decode_bytes, target, settings.max_pixels)
    rgba = largest_side("RGBA", settings.max_decode_bytes, target, settings.max_pixels)
    kinds = {f"16-bit PNG {near}x{near}": encoded(Image.fromarray(ramp(near)), "PNG", compress_level=9),
             f"JPEG {near}x{near}": encoded(colour(near, alpha=False), "JPEG", quality=50),
             f"RGB PNG {rgb}x{rgb}": encoded(colour(rgb, alpha=False), "PNG", compress_level=9),
             f"RGBA PNG {rgba}x{rgba}": encoded(colour(rgba, alpha=True), "PNG", compress_level=9),
             f"RGBA PNG {near}x{near} (over this commit's decode limit)": encoded(colour(near, alpha=True), "PNG",
                                                                        compress_level=9)}
    for name, content in kinds.items():
        assert len(content) <= settings.max_upload_bytes, f"{name}: {len(content):,} bytes, over the upload limit"
    return kinds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(code: Path, index: Path, checkpoint_dir: Path) -> Iterator[tuple[str, int]]:
    """`matvit serve` from the checkout `code` with default settings on a free loopback port: (URL, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--index", str(index), "--checkpoint",
                                str(checkpoint_dir), "--port", str(port)], cwd=code,
                               env={**os.environ, "PYTHONPATH": str(code)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        for _ in range(2400):
            if process.poll() is not None:
                raise SystemExit(f"the server from {code} exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            raise SystemExit("the server did not become ready in 10 minutes")
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def status_bytes(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh at the current resident size (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def fire(url: str, contents: list[bytes]) -> tuple[dict[str, int], float]:
    """All uploads at once, one thread each: (count per HTTP status and error code, seconds until the last)."""
    statuses: dict[str, int] = {}
    lock, start = threading.Lock(), threading.Barrier(len(contents))

    def post(content: bytes) -> None:
        start.wait()
        try:
            r = httpx.post(f"{url}/v1/search", files={"file": ("upload", content, "application/octet-stream")},
                           data={"k": "5"}, timeout=600)
            key = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"
        except httpx.HTTPError as e:
            key = type(e).__name__
        with lock:
            statuses[key] = statuses.get(key, 0) + 1

    began = time.perf_counter()
    threads = [threading.Thread(target=post, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.perf_counter() - began


def measure(code: Path, index: Path, checkpoint_dir: Path, kinds: dict[str, bytes], warm: bytes,
            clients: int) -> dict:
    """Idle and per-phase peak resident memory of a server from `code` under `clients` concurrent uploads."""
    with server(code, index, checkpoint_dir) as (url, pid):
        assert httpx.post(f"{url}/v1/search", files={"file": ("q.png", warm, "image/png")}).status_code == 200
        time.sleep(1)
        idle = status_bytes(pid, "VmRSS")
        phases = []
        names = list(kinds)
        for name in [*names, "all kinds mixed"]:
            batch = [kinds[name]] * clients if name in kinds else [kinds[names[i % len(names)]] for i in range(clients)]
            reset_peak(pid)
            statuses, seconds = fire(url, batch)
            peak = status_bytes(pid, "VmHWM")
            phases.append({"kind": name, "uploads": clients, "upload_bytes": max(len(c) for c in batch),
                           "statuses": statuses, "seconds": round(seconds, 2), "peak_rss": peak,
                           "peak_over_idle": peak - idle})
            print(f"  {name}: {statuses}, peak {peak / MiB:,.0f} MiB ({(peak - idle) / MiB:+,.0f}), {seconds:.1f} s",
                  flush=True)
    return {"idle_rss": idle, "phases": phases, "peak_rss": max(p["peak_rss"] for p in phases)}


def gallery(preset: str, out: Path, count: int) -> tuple[Path, Path, int]:
    """A random (seeded) checkpoint of `preset`, an index of `count` digits embedded with it and its latency
    profile."""
    torch.manual_seed(0)
    config = get_preset(preset).model
    checkpoint.save(MatViT(config), out / "checkpoint", preset=preset, dataset=None, weights="random (seed 0)",
                    classes=[str(i) for i in range(config.num_classes)])
    digits = data.load("digits", "train", config.img_size, config.in_chans)
    subset = data.ImageSet(digits.images[:count], digits.labels[:count], digits.classes, digits.sources[:count])
    source = build.DatasetSource("digits", "train", config.img_size, config.in_chans, images=subset)
    build.build(Encoder.load(out / "checkpoint"), source, out / "index")
    with server(ROOT, out / "index", out / "checkpoint"):
        pass  # a first server measures the latency profile (as served) and stores it: the measured ones load it
    return out / "checkpoint", out / "index", config.img_size


def write_markdown(result: dict, out: Path) -> None:
    limits, ceiling = result["limits"], result["ceiling"]
    lines = ["# API server memory under concurrent worst-case uploads", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores.", "",
             f"Model: random `{result['preset']}` ({result['img_size']}-pixel input), index of {result['gallery']} "
             f"digits; server with default settings: max_pixels {limits['max_pixels']:,}, max_decode_bytes "
             f"{limits['max_decode_bytes']:,} ({limits['max_decode_bytes'] / MiB:,.0f} MiB), decode_slots "
             f"{limits['decode_slots']}, max_upload_bytes {limits['max_upload_bytes']:,}.", "",
             "Each phase sends its uploads at once (one `/v1/search` each) and reads the server's peak resident "
             "memory (VmHWM, reset before the phase).", ""]
    for run in result["runs"]:
        lines += [f"## {run['label']}: {run['clients']} concurrent uploads", "",
                  f"Resident once warm: {run['idle_rss'] / MiB:,.0f} MiB. Peak: **{run['peak_rss'] / MiB:,.0f} MiB**."
                  + (f" Ceiling: {run['ceiling'] / MiB:,.0f} MiB (idle + {limits['decode_slots']} x "
                     f"{limits['max_decode_bytes'] / MiB:,.0f} MiB decoding + {run['clients']} x "
                     f"{ceiling['largest_upload'] / MiB:.1f} MiB bodies); within it: **"
                     f"{'yes' if run['peak_rss'] <= run['ceiling'] else 'no'}**." if "ceiling" in run else ""), "",
                  "| upload | bytes | answers | peak MiB | over idle MiB | seconds |", "|---|---:|---|---:|---:|---:|"]
        for p in run["phases"]:
            answers = ", ".join(f"{n} x {k}" for k, n in sorted(p["statuses"].items()))
            lines.append(f"| {p['kind']} | {p['upload_bytes']:,} | {answers} | {p['peak_rss'] / MiB:,.0f} | "
                         f"{p['peak_over_idle'] / MiB:+,.0f} | {p['seconds']} |")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/decode-memory"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--preset", default="matvit-ti16")
    parser.add_argument("--gallery", type=int, default=64, help="digits in the index")
    parser.add_argument("--compare", type=Path, help="another checkout to measure the same way (e.g. main)")
    parser.add_argument("--compare-label", default="main")
    parser.add_argument("--compare-clients", type=int, default=4)
    args = parser.parse_args()
    settings = Settings(index="", checkpoint=Path())
    limits = {name: getattr(settings, name) for name in ("max_pixels", "max_decode_bytes", "decode_slots",
                                                           "max_upload_bytes")}
    work = Path(tempfile.mkdtemp(prefix="decode-memory-"))
    try:
        checkpoint_dir, index, img_size = gallery(args.preset, work, args.gallery)
        kinds = uploads(settings, img_size)
        warm = encoded(Image.new("RGB", (img_size, img_size), (90, 120, 150)), "PNG")
        largest = max(len(c) for c in kinds.values())
        runs = []
        for label, code, clients in [("this commit", ROOT, args.clients)] + (
                [(args.compare_label, args.compare.resolve(), args.compare_clients)] if args.compare else []):
            print(f"{label} ({code}), {clients} concurrent uploads:", flush=True)
            run = {"label": label, "code": str(code), "clients": clients,
                   **measure(code, index, checkpoint_dir, kinds, warm, clients)}
            if code == ROOT:
                run["ceiling"] = run["idle_rss"] + limits["decode_slots"] * limits["max_decode_bytes"] + \
                    clients * largest
            runs.append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = ["python", "scripts/decode_memory.py", *sys.argv[1:]]
    result = {**provenance.record(), "command": shlex.join(command), "preset": args.preset, "img_size": img_size,
              "gallery": args.gallery,
              "limits": limits, "ceiling": {"formula": "idle_rss + decode_slots * max_decode_bytes + clients * "
                                                       "largest_upload", "largest_upload": largest},
              "uploads": {name: len(content) for name, content in kinds.items()}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out)
    print(f"wrote {args.out / 'result.json'} and README.md")


if __name__ == "__main__":
    main()
