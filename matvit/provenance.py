"""Where a result came from: the command, the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def commit() -> str:
    """The checked-out git commit (with `-dirty` when the tree has changes), or `unknown`."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


_command: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """Remember the command line that is running (the `matvit` CLI calls this with its arguments)."""
    global _command
    _command = list(argv)


def record(command: list[str] | None = None) -> dict:
    """Command, commit and machine; the command defaults to the one set above, else this process's."""
    command = command or _command or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {"command": " ".join(command), "commit": commit(), "machine": machine()}
