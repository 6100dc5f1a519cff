"""`matvit bench index`: build throughput and per-submodel query latency on digits, as JSON and Markdown."""

import json

from app.cli import main


def test_bench_index_writes_its_report(trained_dir, tmp_path, capsys):
    out = tmp_path / "results" / "index-digits"
    assert main(["bench", "index", "--checkpoint", str(trained_dir), "--dataset", "digits",
                 "--index", str(tmp_path / "idx"), "--queries", "4", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["build_in_memory"]["count"] == 1437 and report["build_from_png_files"]["count"] == 360
    assert report["xl_forward"]["images"] == 1437 and report["xl_forward"]["images_per_s"] > 0
    assert list(report["query_latency_ms"]) == ["S", "M", "L", "XL"]
    s, xl = report["query_latency_ms"]["S"], report["query_latency_ms"]["XL"]
    assert {"decode", "encode", "search", "total", "gflops", "params"} <= set(s)
    assert s["gflops"] < xl["gflops"] and s["params"] < xl["params"]
    assert report["command"].startswith("matvit bench index") and report["queries"] == 4
    md = out.with_suffix(".md").read_text()
    assert "1437-image XL index (median of 4" in md and md.count("\n| ") >= 9
    assert "wrote" in capsys.readouterr().out
