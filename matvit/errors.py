"""The one exception type for mistakes a user can make; the doors print it as a one-line message."""

from __future__ import annotations

import os
import re
from pathlib import Path

OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class UserError(ValueError):
    """Bad input from the user (path, image, spec, dataset, checkpoint, option)."""


def redact(message: str, places: dict[str | Path, str]) -> str:
    """`message` for a remote client: each of the server's `places` (a path, as given, absolute or resolved)
    replaced by its public name (`{"/srv/index": "<index>"}`, so `/srv/index/x.json` reads `<index>/x.json`),
    and object reprs (`<_io.BytesIO object at 0x...>`) by `<upload>`: a client learns what went wrong, not
    where the server keeps its files."""
    names = {}
    for place, public in places.items():
        text = str(place)
        if text.strip("./"):
            for form in (text, os.path.abspath(text), str(Path(text).resolve())):
                names[form] = public
    for form in sorted(names, key=len, reverse=True):  # the longest first: a path before its parent
        message = re.sub(rf"(?<![\w./~-]){re.escape(form)}(?![\w.-])", lambda _, p=names[form]: p, message)
    return OBJECT_REPR.sub("<upload>", message)


def make_dir(path: str | Path, option: str = "--out") -> Path:
    """`path` as a directory (made with its parents); a `UserError` naming it when a file is in the way or it
    cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UserError(f"{option} {path}: {in_the_way} is a file, not a directory; give another {option}") from None
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create the directory ({e.strerror}); give another {option}") from e
    return path
