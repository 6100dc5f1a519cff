"""The documentation holds together: every relative link and #anchor in README.md and docs/ resolves (GitHub's
heading slugs), every `matvit ...` command in a fenced code block parses against the real command line and every
`python -m scripts.studies.NAME ...` against that study's own parser (parsed, never run), and the results index names
every result under docs/results/."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
SHELL_ENDS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The lines outside fenced code blocks (fenced lines blanked, so line numbers hold), and each fenced
    block as (language, first line number, body)."""
    prose, blocks, fence, lang, start, body = [], [], None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if fence is None and m:
            fence, lang, start, body = m.group(1), m.group(2).strip().lower(), number + 1, []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[3:].strip():
            blocks.append((lang, start, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation (but - and _) removed, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found = []
    for number, line in enumerate(prose, 1):
        line = re.sub(r"`[^`]*`", "", line)  # inline code
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
    return found


def link_problem(path: Path, target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
        return None
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return f"{file_part} does not exist"
    if ROOT not in dest.parents and dest != ROOT:
        return f"{file_part} lies outside the repository"
    if anchor:
        if dest.is_dir() or dest.suffix != ".md":
            return f"#{anchor} points into {file_part}, which is not a Markdown file"
        if anchor not in anchors(dest):
            return f"no heading with the anchor #{anchor} in {_rel(dest)}"
    return None


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_and_anchors_resolve(path):
    problems = [f"{_rel(path)}:{line}: ({target}) {problem}" for line, target in links(path)
                if (problem := link_problem(path, target))]
    assert not problems, "\n".join(problems)


def shell_commands(body: str) -> list[str]:
    """A fenced block's commands, `\\` continuations joined. In a block with `$ ` prompts only the prompted
    lines are commands (the rest is their output)."""
    prompted = any(line.lstrip().startswith("$ ") for line in body.splitlines())
    commands, pending = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if not pending:
            stripped = line.lstrip()
            if prompted and not stripped.startswith("$ "):
                continue
            line = stripped[2:] if prompted else stripped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    if pending:
        commands.append(pending)
    return [c for c in commands if c.strip() and not c.lstrip().startswith("#")]


def tokens(command: str) -> list[str]:
    """The words of one shell command, up to a comment or a pipe, `&&`, `;` or redirection."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    out = []
    for token in lexer:
        if token.startswith("#") or token in SHELL_ENDS:  # a comment, or the end of this command
            break
        out.append(token)
    return out


def invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """('matvit', args) or ('module', args) for a command this test can parse, else None."""
    for i, word in enumerate(words):
        if word == "matvit" or word.endswith("/matvit"):
            return "matvit", words[i + 1:]
        if word == "-m" and i + 1 < len(words):
            module = words[i + 1]
            return ("matvit", words[i + 2:]) if module in ("matvit", "app.cli") else (module, words[i + 2:])
        if word == "make" and i == 0:
            return "make", words[1:]
    return None


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, command line, program, args) of every command in a shell block of README.md and docs/."""
    found = []
    for path in DOCS:
        _, blocks = split_fences(path.read_text(encoding="utf-8"))
        for lang, start, body in blocks:
            if lang not in SHELL_LANGUAGES:
                continue
            for command in shell_commands(body):
                try:
                    words = tokens(command)
                except ValueError:  # unbalanced quotes
                    words = ["matvit", "--unbalanced-quotes"] if "matvit" in command else []
                if words and (call := invocation(words)):
                    found.append((f"{_rel(path)}:{start}", command.strip(), *call))
    return found


COMMANDS = documented_commands()


@cache
def matvit_parser() -> argparse.ArgumentParser:
    from app.cli import build_parser

    return build_parser()


STUDIES = "scripts.studies."


def module_parser(module: str) -> argparse.ArgumentParser | None:
    """The parser of `python -m MODULE`, where the module has one this test knows: a research study's
    `build_parser()`."""
    if module.startswith(STUDIES):
        name = module.removeprefix(STUDIES)
        assert (ROOT / "scripts" / "studies" / f"{name}.py").is_file(), f"there is no study {module}"
        return importlib.import_module(module).build_parser()
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def parse_error(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def test_the_documents_show_commands():
    programs = {program for *_, program, _ in COMMANDS}
    assert len([c for c in COMMANDS if c[2] == "matvit"]) > 50 and {"matvit", "make"} <= programs
    assert any(p.startswith(STUDIES) for p in programs)  # the research studies' commands are checked too


@pytest.mark.parametrize("where,command,program,args", COMMANDS, ids=[f"{c[0]}:{c[1][:60]}" for c in COMMANDS])
def test_documented_command_parses(where, command, program, args):
    if program == "make":
        missing = [a for a in args if not a.startswith("-") and "=" not in a and a not in make_targets()]
        assert not missing, f"{where}: make has no target {missing} in `{command}`"
        return
    parser = matvit_parser() if program == "matvit" else module_parser(program)
    if parser is None:
        pytest.skip(f"python -m {program} has no parser this test knows")
    error = parse_error(parser, args)
    assert error is None, f"{where}: `{command}` does not parse: {error}"


def test_a_bad_command_is_caught():
    """The check itself: a wrong option and a missing required one are reported, a --help is not."""
    assert parse_error(matvit_parser(), ["search", "--index", "x", "--checkpoint", "y", "--image", "q.jpg",
                                         "--budget", "2"])
    assert parse_error(matvit_parser(), ["build-index", "--images", "photos"])
    assert parse_error(matvit_parser(), ["serve", "--help"]) is None
    assert parse_error(module_parser("scripts.studies.layer_width"), ["--result", "r", "--out", "o"])  # no --cache
    assert parse_error(module_parser("scripts.studies.align"), ["--options", "plain,nope"])
    assert parse_error(module_parser("scripts.studies.align"), ["--epochs", "2", "--out", "o"]) is None
    with pytest.raises(AssertionError, match="no study"):
        module_parser("scripts.studies.nope")
    assert tokens("matvit search --index milvus:http://h:19530#c --submodels 'S;M' # note") == \
        ["matvit", "search", "--index", "milvus:http://h:19530#c", "--submodels", "S;M"]
    assert [c.split() for c in shell_commands("$ matvit index info \\\n    --index runs/idx\n{\"count\": 3}")] == \
        [["matvit", "index", "info", "--index", "runs/idx"]]
    assert [c.split() for c in shell_commands("# build\nmatvit index info \\\n  --index a\nmake test")] == \
        [["matvit", "index", "info", "--index", "a"], ["make", "test"]]


def test_github_slugs():
    assert github_slug("Mix'n'Match order and layer width") == "mixnmatch-order-and-layer-width"
    assert github_slug("Results index (`docs/results/`)") == "results-index-docsresults"
    assert github_slug("GPUs, mixed precision and torchrun") == "gpus-mixed-precision-and-torchrun"
    assert github_slug("[Link](x.md) and **bold**") == "link-and-bold"


def test_readme_is_a_short_product_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    _, blocks = split_fences(text)
    first = blocks[0][2]
    assert "make quickstart" in first and "make test" in first  # the two commands on top; .ci/run calls make test


def test_the_results_index_names_every_result():
    results = ROOT / "docs" / "results"
    index = (results / "README.md").read_text(encoding="utf-8")
    names = {p.name.split(".")[0] for p in results.iterdir() if p.name != "README.md"}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", index))
    assert not missing, f"docs/results/README.md does not mention {missing}"
