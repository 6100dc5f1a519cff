"""Resumable benchmark steps: each step's result is a JSON file that a rerun with the same settings reuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def _set_only(value):
    """`value` with every dict entry whose value is None left out, at any depth."""
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    return value


def same_settings(saved: dict | None, given: dict) -> bool:
    """True when two steps' settings agree; an option left unset (None) counts as absent, so a step written
    before an option existed still matches while the option is unset."""
    return saved is not None and _set_only(saved) == _set_only(given)


def saved(path: Path, settings: dict, log: Callable[[str], None]) -> dict | None:
    """The step's result at `path` when it was written with these `settings`, else None (measure it again)."""
    if path.is_file():
        row = json.loads(path.read_text())
        if same_settings(row.get("settings"), settings):
            log(f"[{path.stem}] done before: {path}")
            return row
    return None


def write(path: Path, row: dict) -> dict:
    """Write a step's result whole (aside, then renamed: an interrupted write leaves no half file)."""
    tmp = path.with_name(f".{path.name}")
    tmp.write_text(json.dumps(row, indent=2))
    tmp.replace(path)
    return row
