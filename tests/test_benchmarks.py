"""The op benchmark runs end to end on a small size and writes consistent result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_op_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_op.py"])
    import bench_op

    json_path, markdown_path = tmp_path / "op.json", tmp_path / "op.md"
    argv = ["--sizes", "65", "--landmarks", "8", "--repeats", "1", "--min-seconds", "0", "--max-idle-wait", "0"]
    assert bench_op.main([*argv, "--json", str(json_path), "--markdown", str(markdown_path)]) == 0
    report = json.loads(json_path.read_text())
    (row,) = report["rows"]
    assert row["tokens"] == 65 and row["fna"]["min"] > 0 and row["sdpa"]["min"] > 0
    assert "load_average_end" in report["machine"]
    markdown = markdown_path.read_text()
    assert markdown.startswith("`python ") and "| 65 |" in markdown
    assert "| 65 |" in capsys.readouterr().out
