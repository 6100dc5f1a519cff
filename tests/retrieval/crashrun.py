"""Runs commands for the crash tests, each in a new process: a fork of this one, which imported matvit once
(the crash tests run many commands; importing torch for each would cost seconds).

Reads one JSON request per line on stdin and answers one JSON line on stdout:

    {"argv": [...], "env": {...}, "chunk": 4}            `matvit ARGV` (app.cli.main) with env set
    {"call": "api_add", "index": I, "checkpoint": C, "images": [PATH, ...], "env": ...}
    {"call": "api_delete", "index": I, "checkpoint": C, "ids": [...], "env": ...}
                                                          what POST /v1/items and DELETE /v1/items/ID run
    -> {"status": exit code, or -signal number when killed, "output": stdout and stderr}

`chunk` sets `retrieval.embedding.CHUNK` (images per chunk file) in the child.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import faiss  # noqa: E402, F401  (imported once here, for every child)
import timm  # noqa: E402, F401
import torch  # noqa: E402

from app import cli  # noqa: E402
from matvit.errors import UserError  # noqa: E402
from retrieval import embedding  # noqa: E402
from retrieval.retriever import Retriever  # noqa: E402

cli.build_parser()  # imports what every command's parser needs


def _run(request: dict) -> int:
    torch.set_num_threads(1)  # tiny batches: threads would only wait on each other (and the suite's other work)
    os.environ.update(request.get("env", {}))
    embedding.CHUNK = request.get("chunk", embedding.CHUNK)
    if "argv" in request:
        return cli.main(request["argv"])
    retriever = Retriever(request["index"], Path(request["checkpoint"]))
    if request["call"] == "api_add":
        items = retriever.add([Path(p).read_bytes() for p in request["images"]], wait=0)
        print(json.dumps([item["id"] for item in items]))
    else:
        print(json.dumps(retriever.remove(request["ids"], wait=0)))
    return 0


def run_in_child(request: dict) -> dict:
    with tempfile.TemporaryFile() as output:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                code = _run(request)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except UserError as e:  # what the API answers with a 4xx/5xx
                print(f"error: {e}", file=sys.stderr)
                code = 2
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        output.seek(0)
        return {"status": os.waitstatus_to_exitcode(status), "output": output.read().decode(errors="replace")}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(run_in_child(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
