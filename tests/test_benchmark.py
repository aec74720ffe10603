"""The benchmark script runs end to end on one small case: every contender passes its correctness
guard (outputs and source gradients against the forum recipe) and the JSON has what the README's
tables are made from. Timings are not judged here; they live in the benchmark's own output."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_case_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--shapes", "depthwise 3x3 b1",
           "--transforms", "tanh", "--reps", "4", "--warmup", "1", "--case-budget", "0.5",
           "--compile", "none", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| plain ms |" in result.stdout  # the ratio table was printed
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    rows = {(r["mode"], r["contender"]) for r in report["results"]}
    for contender in ("plain", "fusedtie", "forum", "parametrize"):
        assert ("inference", contender) in rows and ("train", contender) in rows
    assert ("inference", "fusedtie+cache") in rows and ("train", "fusedtie+cache") not in rows
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["ratio_to_plain"] > 0 and len(r["samples_ms"]) >= 4
