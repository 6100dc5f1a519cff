"""`matvit serve` and `matvit demo`: the REST API and the Streamlit demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app import options
from matvit.errors import UserError


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import uvicorn

    from app.api import Settings, create_app

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    if args.metrics_need_key and api_key is None:
        raise UserError("--metrics-need-key needs an API key (--api-key-env)")
    settings = Settings(index=args.index, checkpoint=args.checkpoint, api_key=api_key,
                        metrics_need_key=args.metrics_need_key, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                        max_pixels=args.max_pixels, max_decode_bytes=args.max_decode_mb * 1024 * 1024,
                        decode_slots=args.decode_slots, max_batch=args.max_batch,
                        max_item_image_bytes=args.max_item_image_mb * 1024 * 1024, write_wait=args.write_wait,
                        backend=args.backend, inference_slots=args.inference_slots, batch_wait_ms=args.batch_wait_ms)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


def _supervise(command: list[str]) -> int:
    """Run `command` as a child and wait for it; SIGTERM and SIGINT to this process are passed on to the child
    and waited for, so stopping this process stops the child too. Returns the child's exit status."""
    import signal
    import subprocess

    child = subprocess.Popen(command)
    forward = {sig: signal.signal(sig, lambda signum, _: child.send_signal(signum))
               for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # this process is leaving on an error of its own
            child.kill()
            child.wait()


def cmd_demo(args: argparse.Namespace) -> None:
    from retrieval.store import open_store

    open_store(args.index).check_present()
    if not args.checkpoint.is_dir():
        raise UserError(f"checkpoint directory not found: {args.checkpoint}")
    demo = Path(__file__).parent.parent / "demo.py"
    command = [sys.executable, "-m", "streamlit", "run", str(demo), "--server.headless", "true",
               "--server.address", args.host, "--server.port", str(args.port), "--browser.gatherUsageStats", "false",
               "--server.maxUploadSize", "10",  # MB, as the API's largest image file
               "--", "--index", str(args.index), "--checkpoint", str(args.checkpoint), "--results", str(args.results)]
    status = _supervise(command)
    if status > 0:
        raise SystemExit(status)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `serve` and `demo` under `matvit`'s subcommands."""
    p = sub.add_parser("serve", help="serve the REST API (OpenAPI docs at /docs)")
    options.backend(p)
    options.index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    p.add_argument("--metrics-need-key", action="store_true", help="put /metrics behind the API key too")
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest image file in a request")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, from its header")
    p.add_argument("--max-decode-mb", type=int, default=128,
                   help="most memory decoding one image may hold (pixels x 1-4 bytes by mode, twice with alpha)")
    p.add_argument("--decode-slots", type=int, default=4,
                   help="images decoding at once (decoding holds at most slots x --max-decode-mb)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in a batch search or an item add")
    p.add_argument("--max-item-image-mb", type=int, default=32, help="largest gallery image file served back")
    p.add_argument("--inference-slots", type=int, default=2,
                   help="query batches encoding at once (torch gets cores / slots threads each)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a query batch waits for concurrent requests still decoding to join it")
    p.add_argument("--write-wait", type=float, default=30.0,
                   help="seconds an item add or delete waits for another writer of the index before 409")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the Streamlit demo (query, compare S with XL, benchmark plots)")
    options.index(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("docs/results"), help="where benchmark PNGs are")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_demo)
