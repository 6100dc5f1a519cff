"""The command line: train and export end to end, and one-line errors for user mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from retrieval.encoder import Encoder


def test_export_through_the_cli(trained_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(trained_dir), "--submodel", "S,M,L,XL", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["widths"] == [16, 32, 64, 128]
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["export", "--checkpoint", "/no/such/run", "--out", "x"], "no checkpoint at /no/such/run"),
    (["train", "--preset", "matvit-tiny-digits", "--dataset", "nope", "--out", "x"], "unknown dataset 'nope'"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_submodel_spec_is_one_line(trained_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(trained_dir), "--submodel", "S,XXL,M,L", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["matvit: error: unknown granularity 'XXL' in submodel spec; allowed: S, M, L, XL"]


def test_train_cli_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "matvit-tiny-digits", "--dataset", "digits", "--out", str(out),
                 "--epochs", "1", "--mode", "sample"]) == 0
    text = capsys.readouterr().out
    assert "granularity" in text and "XL" in text
    assert json.loads((out / "eval.json").read_text())["command"].startswith("matvit")


@pytest.fixture(scope="module")
def cli_index(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "index"
    assert main(["build-index", "--checkpoint", str(trained_dir), "--dataset", "digits", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def query_png(tmp_path_factory):
    from PIL import Image

    from matvit import data

    path = tmp_path_factory.mktemp("query") / "q.png"
    Image.fromarray(data.load("digits", "test", 8, 1).images[0, 0].numpy()).resize((40, 40)).save(path)
    return path


def test_search_json_and_table(cli_index, trained_dir, query_png, capsys):
    capsys.readouterr()
    base = ["search", "--index", str(cli_index), "--checkpoint", str(trained_dir), "--image", str(query_png)]
    assert main(base + ["-k", "3", "--submodel", "S", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert result["submodel"]["spec"] == "S"
    assert set(result["timings_ms"]) == {"decode", "queue", "encode", "search", "metadata", "total"}
    assert result["prepare_ms"] > 0  # building the submodel, kept out of the query's encode time
    assert main(base + ["--budget-gflops", "1"]) == 0
    text = capsys.readouterr().out
    assert "submodel XL" in text and "timings (ms)" in text and "; prepare " in text


@pytest.mark.parametrize("spec", ["", " ", ","])
def test_an_empty_submodel_is_refused_not_taken_for_xl(cli_index, trained_dir, query_png, spec, capsys):
    capsys.readouterr()
    assert main(["search", "--index", str(cli_index), "--checkpoint", str(trained_dir), "--image", str(query_png),
                 "--submodel", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty token in submodel spec" in err[0]


def test_index_info_and_profile(cli_index, trained_dir, capsys, tmp_path):
    assert main(["index", "info", "--index", str(cli_index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 1437 and info["submodel"] == "XL" and not info["unfinished_build"]
    assert main(["profile", "--checkpoint", str(trained_dir), "--index", str(cli_index), "--dataset", "digits",
                 "--submodels", "S;S,S,M,XL;XL", "--report", str(tmp_path / "budget")]) == 0
    profile = json.loads((cli_index / "profile.json").read_text())
    assert [r["spec"] for r in profile["rows"]] == ["S", "S,S,M,XL", "XL"]
    assert all(r["knn1"] > 0.5 and r["latency_ms_b1"] > 0 for r in profile["rows"])
    assert json.loads((tmp_path / "budget.json").read_text()) == profile
    table = (tmp_path / "budget.md").read_text()
    assert table.count("| `S` |") >= 1 and "most accurate measured 1-NN" in table and profile["command"] in table


@pytest.mark.parametrize("extra, message", [
    (["--image", "/no/such.png"], "no such image file: /no/such.png"),
    (["--submodel", "S,M"], "has 2 layers but the model has depth 4"),
    (["--budget-ms", "0.000001"], "no submodel fits 1e-06 ms; the cheapest is"),
])
def test_search_errors_are_one_line(cli_index, trained_dir, query_png, capsys, extra, message):
    argv = ["search", "--index", str(cli_index), "--checkpoint", str(trained_dir), "--image", str(query_png)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unreadable_query_image(cli_index, trained_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["search", "--index", str(cli_index), "--checkpoint", str(trained_dir), "--image", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_eval_grid_cli(trained_dir, tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert main(["eval-grid", "--index-checkpoint", str(trained_dir), "--dataset", "digits",
                 "--index-submodels", "XL", "--query-submodels", "S;XL", "--out", str(out)]) == 0
    grid = json.loads(out.read_text())["grid"]
    assert list(grid) == ["XL"] and list(grid["XL"]) == ["S", "XL"]
    assert out.with_suffix(".png").is_file()


def test_random_checkpoint_script_writes_a_loadable_checkpoint_of_the_preset(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "random_checkpoint.py"
    subprocess.run([sys.executable, str(script), "--preset", "matvit-tiny-digits", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    encoder = Encoder.load(tmp_path)
    assert encoder.image_size == 8 and [s.text for s in encoder.named()] == ["S", "M", "L", "XL"]
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == "random (seed 0)"


HEAVY = ("matplotlib", "onnx", "onnxruntime", "pymilvus", "fastapi", "streamlit")


@pytest.mark.parametrize("call", ["app.cli.build_parser()", "app.cli.main(['--help'])",
                                  "app.cli.main(['search', '--help'])"])
def test_the_parser_imports_no_heavy_library(call):
    """Building the parser, `matvit --help` and `matvit search --help` import neither plotting, ONNX, Milvus, the web
    framework nor the demo's: the commands that use them import them when they run."""
    code = (f"import sys, app.cli\ntry:\n    {call}\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
