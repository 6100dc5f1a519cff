"""Screenshot of the Streamlit demo answering a query, taken in headless Chromium on loopback.

    python scripts/screenshot_demo.py --index IDX --checkpoint DIR --out docs/demo.png
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from matvit import checkpoint, data
from matvit.images import to_hwc

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--query", type=int, default=0, help="which test-split image to upload")
    args = parser.parse_args()

    meta = checkpoint.read_config(args.checkpoint)
    test = data.load(meta["dataset"], "test", meta["model"]["img_size"], meta["model"]["in_chans"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = Path(__file__).resolve().parent.parent / "app" / "demo.py"
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(demo), "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false", "--",
         "--index", str(args.index), "--checkpoint", str(args.checkpoint)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
            query = Path(tmp) / f"{test.classes[int(test.labels[args.query])]}.png"
            Image.fromarray(to_hwc(test.images[args.query])).resize((112, 112)).save(query)
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url, timeout=60_000)
            page.get_by_text("Upload an image or draw a random test image").wait_for(timeout=120_000)
            page.locator("input[type=file]").set_input_files(str(query))
            # Streamlit renders incrementally: wait for all three result captions (chosen, S, XL).
            try:
                page.get_by_text("GFLOPs").nth(2).wait_for(timeout=120_000)
            except PlaywrightTimeout:
                raise SystemExit("the demo showed no submodel results") from None
            time.sleep(2)  # let the result images finish loading
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
