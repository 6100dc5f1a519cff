"""Resumable benchmark steps: each step's result is a JSON file that a rerun with the same settings reuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def saved(path: Path, settings: dict, log: Callable[[str], None]) -> dict | None:
    """The step's result at `path` when it was written with these `settings`, else None (measure it again)."""
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("settings") == settings:
            log(f"[{path.stem}] done before: {path}")
            return row
    return None


def write(path: Path, row: dict) -> dict:
    """Write a step's result whole (aside, then renamed: an interrupted write leaves no half file)."""
    tmp = path.with_name(f".{path.name}")
    tmp.write_text(json.dumps(row, indent=2))
    tmp.replace(path)
    return row
