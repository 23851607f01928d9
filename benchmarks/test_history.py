"""benchmarks/history.py: rows of a made-up results.json (values known), appending twice adds
nothing, and every committed results file is in the committed history.

    python -m pytest benchmarks/test_history.py
"""

import csv
import glob
import json
import os

import history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results(date="2026-12-01T10:00:00+00:00"):
    ok = {"status": "ok"}
    return {
        "machine": {"date": date, "cpu": "AMD EPYC", "cpu_count": 2, "torch": "2.14.1",
                    "hypercolumn_ops_commit": "abc1234", "device": "cpu"},
        "settings": {"device": "cpu", "dtype": "float32", "set": "quick"},
        "results": [
            {"workload": "sds", "op": "fused_hypercolumn", "method": "classify_then_sample", "relative_error": 1.5e-6,
             "modes": {"forward": dict(ok, median_ms=60.0, best_fused_speedup=10.0, peak_bytes=3 << 20),
                       "forward+backward": dict(ok, median_ms=350.0, best_fused_speedup=14.0, peak_bytes=5 << 20),
                       "forward+backward, deterministic": {"status": "CUDA only"}}},
            {"workload": "sds", "op": "fused_hypercolumn", "method": "fused/native",
             "modes": {"forward": dict(ok, median_ms=6.0, best_fused_speedup=1.0),
                       "forward+backward": {"status": "failed", "detail": "out of memory"}}},
            {"workload": "sds", "op": "fused_hypercolumn", "method": "naive",
             "modes": {"forward": {"status": "not in the quick set"}}},
        ],
    }


def test_rows_of_one_results_file():
    rows = history.rows(results())
    assert [row["method"] for row in rows] == ["classify_then_sample", "fused/native"]  # naive never ran
    first, second = rows
    assert first["machine"] == "AMD EPYC, 2 cores" and first["commit"] == "abc1234"
    assert (first["fwd_ms"], first["fwd_bwd_ms"], first["det_fwd_bwd_ms"]) == ("60", "350", "")
    assert (first["fwd_speedup"], first["fwd_bwd_speedup"]) == ("10", "14")
    assert (first["fwd_peak_mib"], first["fwd_bwd_peak_mib"], first["rel_error"]) == ("3", "5", "1.50e-06")
    # A mode that failed leaves its cells empty; a missing error or memory too.
    assert (second["fwd_ms"], second["fwd_bwd_ms"], second["fwd_peak_mib"], second["rel_error"]) == ("6", "", "", "")
    assert history.rows(results(), commit="def5678", note="n")[0]["commit"] == "def5678"


def test_append_is_idempotent(tmp_path):
    path = str(tmp_path / "history.csv")
    assert history.append(results(), path) == 2
    assert history.append(results(), path) == 0
    assert history.append(results(date="2026-12-02T10:00:00+00:00"), path) == 2
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == history.COLUMNS
        assert len(list(reader)) == 4


def test_committed_results_are_in_the_history():
    committed = {tuple(row[k] for k in history.KEY) for row in history.read_history(history.HISTORY)}
    paths = glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "results.json"), recursive=True)
    assert paths
    for path in paths:
        with open(path) as handle:
            for row in history.rows(json.load(handle)):
                assert tuple(row[k] for k in history.KEY) in committed, f"{path}: {row['workload']} {row['method']}"
